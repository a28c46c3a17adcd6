"""docker-compose.yml and docker-compose.gpu.yml read as compose reads them: what each way of starting
them starts, and which host ports that publishes."""

from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def _services(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))["services"]


def _started(services: dict, profiles: set[str]) -> dict:
    """What `docker compose [--profile P …] up` starts when it names no service: every service without
    profiles, and those with an active one."""
    return {name: service for name, service in services.items()
            if not service.get("profiles") or profiles & set(service["profiles"])}


def _host_ports(service: dict) -> list[str]:
    """Host side of each published port, short syntax ("127.0.0.1:8080:8080" -> "127.0.0.1:8080")."""
    return [str(port).rsplit(":", 1)[0] for port in service.get("ports", [])]


def test_no_profile_combination_starts_two_services_on_one_host_port():
    services = _services("docker-compose.yml")
    profiles = {profile for service in services.values() for profile in service.get("profiles", [])}
    for active in [set(), *({profile} for profile in profiles), profiles]:
        published = Counter(port for service in _started(services, active).values() for port in _host_ports(service))
        assert {port: count for port, count in published.items() if count > 1} == {}, active


def test_the_gpu_file_changes_the_one_sidecar_to_the_gpu_image_adding_no_service_and_no_port():
    base, gpu = _services("docker-compose.yml"), _services("docker-compose.gpu.yml")
    assert set(gpu) == {"sidecar"} <= set(base)
    sidecar = gpu["sidecar"]
    # compose appends an override's ports to the service's own, and a profile there would hide the service.
    assert "ports" not in sidecar and "profiles" not in sidecar and "profiles" not in base["sidecar"]
    assert sidecar["build"]["dockerfile"] == "docker/Dockerfile.gpu" and (ROOT / "docker/Dockerfile.gpu").is_file()
    assert sidecar["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
