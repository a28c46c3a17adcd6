"""docs/kubernetes.md's manifest against the code: the probes ask routes the app has, on the port gunicorn binds,
the grace outlasts gunicorn's, the pod runs as the images' user, every path the server writes is mounted, the
HTTPS cluster's CA file comes from a Secret the docs create."""

import re
from pathlib import Path, PurePosixPath

import pytest
import yaml
from flask import Flask

from sidecar.api import ops
from sidecar.api.auth import KeyGuard, key_entry, new_key, parse_key_entries
from sidecar.api.healthcheck import config_bind
from sidecar.config import Settings
from tests.unit.api.test_gunicorn_config import effective_config

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    documents = [doc for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
                 for doc in yaml.safe_load_all(block)]
    return {doc["kind"]: doc for doc in documents}


@pytest.fixture(scope="module")
def pod(manifest) -> dict:
    return manifest["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (only,) = pod["containers"]
    return only


@pytest.fixture(scope="module")
def gunicorn() -> dict[str, str]:
    return effective_config()


def _probe_url(probe: dict, container: dict) -> tuple[str, int]:
    """The path and port an httpGet probe asks."""
    port = probe["httpGet"]["port"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return probe["httpGet"]["path"], named.get(port, port)


def test_the_probes_ask_the_apps_own_routes_on_the_port_gunicorn_binds_and_need_no_key(container):
    app = Flask("routes")
    app.register_blueprint(ops.bp)
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    port = int(config_bind({}).rsplit(":", 1)[1])
    asked = {kind: _probe_url(container[kind], container) for kind in ("startupProbe", "readinessProbe")}
    assert asked == {"startupProbe": ("/healthz", port), "readinessProbe": ("/readyz", port)}
    assert {path for path, _ in asked.values()} <= routes
    # The manifest sets SIDECAR_API_KEYS, and the kubelet's httpGet sends no key: the guard must let both through.
    assert "SIDECAR_API_KEYS" in {variable["name"] for variable in container["env"]}
    guard = KeyGuard(parse_key_entries(key_entry("web", ["search"], new_key())))
    assert all(guard.check(None, path) is None for path, _ in asked.values())


def test_liveness_asks_the_port_not_an_http_route_which_waits_behind_queued_requests_under_load(container):
    # A worker's threads take connections in arrival order: a saturated pod answered no /healthz in 3 s for 20 s
    # (docs "Probes under load"), and an HTTP liveness probe would have restarted it, dropping its requests.
    liveness = container["livenessProbe"]
    assert "httpGet" not in liveness and "exec" not in liveness
    assert liveness["tcpSocket"]["port"] in {port["name"] for port in container["ports"]}


def test_the_grace_outlasts_gunicorns_after_the_prestop_pause_and_the_startup_probe_its_boot_timeout(pod, container,
                                                                                                     gunicorn):
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pause + int(gunicorn["graceful_timeout"])
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(gunicorn["timeout"])


def test_the_pod_runs_as_the_images_numeric_user_on_a_read_only_root_with_every_written_path_mounted(pod, container):
    mounts = [PurePosixPath(mount["mountPath"]) for mount in container["volumeMounts"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / dockerfile).read_text(encoding="utf-8")
        (user,) = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
        assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        env = dict(re.findall(r"\b(SIDECAR_[A-Z0-9_]+)=(\S+)", text.replace("\\\n", " ")))
        # What the server writes (strace of a serving gunicorn: the docs' "Writable paths"): the settings'
        # paths, and the temporary folder (gunicorn's heartbeat files, the metrics folder).
        written = [env[f"SIDECAR_{name.upper()}"] for name in ("store_path", "text_cache_path", "prompt_sets_dir")]
        for path in [*written, "/tmp"]:
            assert any(PurePosixPath(path).is_relative_to(mount) for mount in mounts), (dockerfile, path)


def test_every_variable_the_manifest_sets_is_a_setting_or_one_gunicorns_config_reads(container):
    read_by_gunicorn = set(re.findall(r"\bGUNICORN_[A-Z_]+",
                                      (ROOT / "sidecar/api/gunicorn_config.py").read_text(encoding="utf-8")))
    settings = {f"SIDECAR_{name.upper()}" for name in Settings.__dataclass_fields__}
    names = {variable["name"] for variable in container["env"]}
    assert names - settings - read_by_gunicorn == set()


def test_the_service_sends_to_the_containers_named_port(manifest, container):
    (port,) = manifest["Service"]["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}


def _commands() -> str:
    """The docs' shell commands (its bash blocks)."""
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    return "".join(re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL))


def test_the_docs_commands_create_the_opensearch_index_the_readiness_probe_waits_for(container):
    # /readyz answers 503 while the alias does not exist: without `opensearch setup` no pod would become Ready.
    assert {"name": "SIDECAR_STORE", "value": "opensearch"} in container["env"]
    commands = _commands()
    assert re.search(r"^kubectl exec deploy/clip-sidecar -- .*clip-sidecar opensearch setup$", commands,
                     flags=re.MULTILINE)


def test_the_https_cluster_is_verified_with_a_ca_file_mounted_read_only_from_a_secret_the_docs_create(pod, container):
    # An in-cluster OpenSearch's certificate is signed by a private CA: with the image's system CAs only, every
    # request failed "certificate verify failed", and no pod became Ready.
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert env["SIDECAR_OPENSEARCH_URL"].startswith("https://") and "opensearch_ca_certs" in Settings.__dataclass_fields__
    ca_file = PurePosixPath(env["SIDECAR_OPENSEARCH_CA_CERTS"])
    (mount,) = [mount for mount in container["volumeMounts"] if ca_file.is_relative_to(mount["mountPath"])]
    assert mount.get("readOnly") is True
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    key = ca_file.relative_to(mount["mountPath"])
    assert re.search(rf"^kubectl create secret generic {volume['secret']['secretName']} --from-file={key}=\S+$",
                     _commands(), flags=re.MULTILINE)
