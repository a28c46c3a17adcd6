"""docker/Dockerfile.cpu and .gpu against the code they package: the torch pair pyproject.toml pins, and a
HEALTHCHECK that leaves a worker the boot gunicorn's config allows it."""

import re
import tomllib
from pathlib import Path

import pytest

from tests.unit.api.test_gunicorn_config import effective_config

ROOT = Path(__file__).parents[2]
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
TORCH_PAIR = ("torch", "torchvision")


def _text(dockerfile: str) -> str:
    return (ROOT / "docker" / dockerfile).read_text(encoding="utf-8").replace("\\\n", " ")


def _pyproject_pins() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", spec).groups() for spec in dependencies if "==" in spec)
    return {name: pins[name] for name in TORCH_PAIR}


def _seconds(duration: str) -> float:
    """A Docker duration as HEALTHCHECK takes it: 90s, 2m, 1m30s."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    return 60 * int(parts[1] or 0) + int(parts[2] or 0)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_installs_the_torch_and_torchvision_pair_pyproject_pins(dockerfile):
    # A pair apart fails at import ("operator torchvision::nms does not exist"); the CPU image names its own
    # (from PyTorch's CPU index), which pip then keeps, so a bump in pyproject.toml alone would not reach it.
    pins = _pyproject_pins()
    named = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', _text(dockerfile)))
    assert named in ({}, pins), (dockerfile, named, pins)
    if dockerfile == "Dockerfile.cpu":
        assert named == pins and "--index-url https://download.pytorch.org/whl/cpu" in _text(dockerfile)
    assert re.search(r"\bpip install \.(\s|$)", _text(dockerfile)), dockerfile  # the rest as pyproject.toml says


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_healthcheck_counts_no_failure_while_a_worker_takes_the_boot_gunicorn_allows(dockerfile):
    # A worker answers /healthz once its model is loaded, and gunicorn gives that load GUNICORN_TIMEOUT: a start
    # period shorter than that marks a container unhealthy (replaced under Swarm) while gunicorn still waits on it.
    (flags,) = re.findall(r"^HEALTHCHECK (.*?) CMD ", _text(dockerfile), flags=re.MULTILINE)
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", flags))
    assert _seconds(options["start-period"]) >= int(effective_config()["timeout"]), (dockerfile, options)


# The settings naming a model the server loads from the image's cache at boot (sidecar.model.weights.configured_models:
# the model, and the fine-ranking model where one is set). A file setting (model_config) needs a COPY, not an argument.
MODEL_VARIABLES = tuple(f"SIDECAR_{name.upper()}" for name in ("model", "pretrained", "fine_model", "fine_pretrained"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_model_the_server_loads_is_a_build_argument_fetched_into_the_image(dockerfile):
    # Workers load cached weights only, and the image's cache is filled at build time: a fine model named only at
    # run time (SIDECAR_FINE_MODEL for the rerank stage) stopped every worker's boot, "not trained yet".
    from sidecar.config import Settings

    assert {name.removeprefix("SIDECAR_").lower() for name in MODEL_VARIABLES} <= set(Settings.__dataclass_fields__)
    text = _text(dockerfile)
    before_fetch = text[:text.index("RUN clip-sidecar models fetch")]
    for variable in MODEL_VARIABLES:
        assert re.search(rf"^ARG {variable}=", before_fetch, flags=re.MULTILINE), (dockerfile, variable)
        assert f"{variable}=${{{variable}}}" in before_fetch, (dockerfile, variable)  # the ENV the fetch and server read


def test_compose_passes_every_model_build_argument_to_the_image():
    import yaml

    build = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["sidecar"]["build"]
    assert set(MODEL_VARIABLES) <= set(build["args"]), build["args"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_command_in_the_image_reads_its_model_offline_after_the_build_fetched_it(dockerfile):
    # Only gunicorn's workers set HF_HUB_OFFLINE themselves: embed, search or opensearch setup run in the container
    # asked huggingface.co about a newer file first, waiting out its timeouts where the network is closed.
    text = _text(dockerfile)
    fetch = text.index("RUN clip-sidecar models fetch")
    offline = re.search(r"^ENV HF_HUB_OFFLINE=1$", text, flags=re.MULTILINE)
    assert offline and offline.start() > fetch, dockerfile
