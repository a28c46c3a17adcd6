"""docker-compose.yml and docker-compose.gpu.yml read as compose reads them: what each way of starting
them starts, and which host ports that publishes."""

import re
from collections import Counter
from pathlib import Path

import yaml

from sidecar.config import Settings, replica_settings

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


def _mounts(service: dict) -> dict[str, bool]:
    """Each mount's path in the container -> whether the container may write it (short syntax)."""
    mounts = {}
    for volume in service["volumes"]:  # SOURCE:TARGET[:MODE]; a SOURCE of ${VARIABLE:-default} holds a colon too
        mode = volume.rsplit(":", 1)[1] if volume.endswith((":ro", ":rw")) else "rw"
        target = volume.removesuffix(f":{mode}").rsplit(":", 1)[1]
        mounts[target] = mode == "rw"
    return mounts


def test_the_readmes_compose_embed_and_index_read_a_mounted_folder_and_write_shards_on_a_writable_volume():
    sidecar = _services("docker-compose.yml")["sidecar"]
    mounts = _mounts(sidecar)
    assert any(volume.startswith("${CLIP_SIDECAR_IMAGES:-") for volume in sidecar["volumes"])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    embed = re.search(r"docker compose run --rm sidecar clip-sidecar embed (\S+) --out (\S+)", readme)
    index = re.search(r"docker compose run --rm sidecar clip-sidecar index (\S+)", readme)
    assert embed and index, "README shows the embed/index flow in compose"
    source, shards = Path(embed[1]), Path(embed[2])

    def mount_of(path: Path) -> str | None:
        return next((target for target in mounts if path.is_relative_to(target)), None)

    assert mount_of(source) is not None, (source, mounts)
    assert mount_of(shards) is not None and mounts[mount_of(shards)], (shards, mounts)  # not the image's /app
    assert Path(index[1]) == shards


def test_the_sidecar_runs_under_an_init_process_so_a_one_off_cli_container_stops_on_sigterm():
    # `docker compose run --rm sidecar clip-sidecar embed …` makes the CLI the container's PID 1, and the kernel
    # drops a signal PID 1 has no handler for: docker stop's SIGTERM was ignored, and `docker compose down` waited
    # out stop_grace_period before it killed the job. docker's init forwards SIGTERM to the command (gunicorn's
    # own handler still stops it gracefully) and reaps what the command leaves behind.
    assert _services("docker-compose.yml")["sidecar"].get("init") is True


def _default(value: str) -> str:
    """What compose makes of `${VARIABLE:-default}` where the variable is unset."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.*)\}", value)
    return match[1] if match else value


def test_without_keys_the_sidecar_answers_the_names_prometheus_and_opensearchs_connectors_call_it_by():
    # An open sidecar answers only Hosts its allowed_hosts admit (DNS rebinding): a scrape or a connector call
    # addressed to a name outside them gets 403, every time.
    from sidecar.api.auth import host_guard

    services = _services("docker-compose.yml")
    environment = services["sidecar"]["environment"]
    assert _default(environment["SIDECAR_API_KEYS"]) == ""
    check = host_guard(_default(environment["SIDECAR_ALLOWED_HOSTS"]))
    scrape = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    targets = [target for job in scrape["scrape_configs"] for config in job["static_configs"]
               for target in config["targets"]]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    connect = re.findall(r"docker compose exec sidecar clip-sidecar opensearch connect --sidecar-url http://(\S+)",
                         readme)
    assert targets and connect
    for host in [*targets, *connect]:
        check(host)  # raises Forbidden where the name is not admitted


def test_the_index_on_composes_single_opensearch_node_asks_for_no_replica_so_it_can_turn_green():
    # OpenSearch never places a replica on its primary's node: an index asking for one on the one node stays yellow
    # for good. The store's default (0-1, expanded to the nodes) asks for none there.
    services = _services("docker-compose.yml")
    assert services["opensearch"]["environment"]["discovery.type"] == "single-node"
    environment = services["sidecar"]["environment"]
    replicas = _default(environment.get("SIDECAR_OPENSEARCH_REPLICAS", Settings().opensearch_replicas))
    assert replica_settings(replicas)["number_of_replicas"] == 0
