"""The sidecar against a secured OpenSearch node (security plugin, TLS, `scripts/opensearch-local start
--secure`): every store operation over HTTPS with certificate verification, as the least-privilege
user `clip-sidecar` (plugin_config/security/roles.yml); what that user is refused; a wrong CA."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner
from opensearchpy import OpenSearch
from opensearchpy.exceptions import TransportError

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.cli import main
from sidecar.config import Settings
from sidecar.stores.base import StoreError, StoreUnavailable
from sidecar.stores.opensearch import OpenSearchStore
from tests.integration.conftest import DIM, SIGNATURE, make_documents
from tests.support import ORIGINAL_ENVIRON, free_port

pytestmark = [pytest.mark.integration, pytest.mark.secure]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "opensearch-local"


@dataclasses.dataclass(frozen=True)
class SecuredNode:
    url: str
    ca_cert: str
    admin: tuple[str, str]
    sidecar: tuple[str, str]

    def client(self, auth: tuple[str, str], *, ca_cert: str | None = None) -> OpenSearch:
        return OpenSearch(hosts=[self.url], http_auth=auth, use_ssl=True, verify_certs=True,
                          ca_certs=ca_cert or self.ca_cert, timeout=30, max_retries=0)

    def store(self, **overrides: object) -> OpenSearchStore:
        kwargs: dict[str, object] = dict(url=self.url, index=f"it-secure-{uuid.uuid4().hex[:10]}", user=self.sidecar[0],
                                         password=self.sidecar[1], ca_certs=self.ca_cert, number_of_replicas=0)
        return OpenSearchStore(**{**kwargs, **overrides})  # type: ignore[arg-type]

    def drop(self, alias: str) -> None:
        """As admin: every index of the alias (the sidecar user may delete versioned ones only)."""
        admin = self.client(self.admin)
        try:
            admin.indices.delete(index=f"{alias}-v*,{alias}-lock", ignore_unavailable=True, expand_wildcards="all")
        finally:
            admin.close()


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # The machine's own environment: the node lives in the real cache, not the test run's.
    return subprocess.run([str(SCRIPT), "--secure", *args], env=ORIGINAL_ENVIRON, capture_output=True, text=True,
                          timeout=timeout)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def secured_node() -> Iterator[SecuredNode]:
    """The secured local node with plugin_config/security/ applied; started here when it is not
    running (about 30-70 s, more on its first start: it downloads and assembles), and then stopped at
    the end of the session."""
    started = _script("status", timeout=60).returncode != 0
    # A node that was already running may hold an older role: apply the checkout's security config.
    result = _script("start", timeout=900) if started else _script("security-apply", timeout=300)
    if result.returncode != 0:
        _unavailable(f"the secured node did not {'start' if started else 'take the security config'} "
                     f"(scripts/opensearch-local --secure): {result.stderr[-3000:]}")
    result = _script("credentials", timeout=60)
    if result.returncode != 0:
        _unavailable(f"no credentials of the secured node (root only): {result.stderr.strip()}")
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    try:
        yield SecuredNode(url=values["OPENSEARCH_URL"], ca_cert=values["OPENSEARCH_CA_CERT"],
                          admin=(values["OPENSEARCH_ADMIN_USER"], values["OPENSEARCH_ADMIN_PASSWORD"]),
                          sidecar=(values["OPENSEARCH_SIDECAR_USER"], values["OPENSEARCH_SIDECAR_PASSWORD"]))
    finally:
        if started:
            _script("stop", timeout=180)


@pytest.fixture
def secure_store(secured_node: SecuredNode) -> Iterator[OpenSearchStore]:
    store = secured_node.store()
    yield store
    store.close()
    secured_node.drop(store.alias)


def sidecar_env(node: SecuredNode, alias: str, **extra: str) -> dict[str, str]:
    return {"SIDECAR_STORE": "opensearch", "SIDECAR_OPENSEARCH_URL": node.url, "SIDECAR_OPENSEARCH_INDEX": alias,
            "SIDECAR_OPENSEARCH_USER": node.sidecar[0], "SIDECAR_OPENSEARCH_PASSWORD": node.sidecar[1],
            "SIDECAR_OPENSEARCH_CA_CERTS": node.ca_cert, **extra}


# ---- every store operation, as clip-sidecar, over verified HTTPS ----------------------------------

def test_every_store_operation_runs_over_verified_https_as_the_least_privileged_user(secure_store):
    store = secure_store
    assert store.url.startswith("https://")
    # Found through GET _nodes/plugins, which the role allows (cluster:monitor/nodes/info).
    assert store.has_neural_search()
    store.setup(DIM)
    store.claim(SIGNATURE)
    assert store.signature() == SIGNATURE
    docs, labels, centres = make_documents(600)
    store.upsert(docs)
    assert store.count() == 600
    nearest = store.vector_search(centres[3], 10)
    assert {labels[int(hit.id[1:])] for hit in nearest} == {3}
    assert [h.id for h in store.vector_search(centres[3], 5, exact=True)][:1] == [nearest[0].id]
    assert all("cluster5" in docs[int(h.id[1:])].text for h in store.text_search("cluster5", 10))
    for fusion in ("minmax", "rrf"):
        assert store.supports_native_hybrid(fusion=fusion, weights=(0.5, 0.5), exact=False)
        assert len(store.hybrid_search(centres[1], "cluster1", 10, fusion=fusion, weights=(0.5, 0.5))) == 10
    assert [d.id for d in store.fetch(["d4", "d2"])] == ["d4", "d2"]
    assert len(store.content_hashes()) == 600
    assert store.delete(["d1", "d2"]) == 2 and store.count() == 598
    before = store.alias_indices()
    new = store.rebuild(docs[:100], signature=SIGNATURE)
    assert store.alias_indices() == [new] and new not in before and store.count() == 100
    assert store.check().clean


def test_the_sidecar_indexes_rebuilds_and_searches_through_its_settings(secured_node, shards, encoder, tmp_path):
    """The settings path a deployment uses (SIDECAR_OPENSEARCH_* with the CA file), from the CLI's
    index and rebuild to the API's search in each mode."""
    alias = f"it-secure-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, **sidecar_env(secured_node, alias)}
    try:
        for extra in ([], ["--rebuild"]):
            result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "index", str(shards), *extra],
                                    env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr
        settings = Settings.from_env(env, cache_dir=tmp_path / "cache")
        assert settings.opensearch_ca_certs == secured_node.ca_cert
        app = create_app(settings, encoder=encoder)
        client = app.test_client()
        try:
            for mode in ("vector", "bm25", "hybrid"):
                response = client.post("/v1/search", json={"text": "red circle", "mode": mode, "k": 5})
                assert response.status_code == 200, response.json
                assert len(response.json["hits"]) == 5 and response.json["store"] == "opensearch"
            assert client.get("/readyz").json["documents"] > 0
        finally:
            state_of(app).encoding.close()
            state_of(app).store.close()
    finally:
        secured_node.drop(alias)


# ---- what the sidecar's user may not do --------------------------------------------------------

@pytest.fixture
def other_index(secured_node: SecuredNode) -> Iterator[str]:
    """An index (with an alias) that is not the sidecar's, made by admin."""
    name = f"other-{uuid.uuid4().hex[:10]}"
    admin = secured_node.client(secured_node.admin)
    admin.indices.create(index=name, body={"settings": {"number_of_shards": 1, "number_of_replicas": 0},
                                           "aliases": {f"{name}-alias": {}}})
    admin.index(index=name, id="secret", body={"text": "not for the sidecar"}, refresh=True)
    yield name
    admin.indices.delete(index=name, ignore_unavailable=True)
    admin.close()


def refused(call) -> int:
    with pytest.raises(TransportError) as info:
        call()
    return info.value.status_code


def test_the_sidecar_user_is_refused_other_indices_and_cluster_settings(secured_node, other_index):
    sidecar = secured_node.client(secured_node.sidecar)
    try:
        assert refused(lambda: sidecar.search(index=other_index, body={"query": {"match_all": {}}})) == 403
        assert refused(lambda: sidecar.get(index=other_index, id="secret")) == 403
        assert refused(lambda: sidecar.count(index=other_index)) == 403
        assert refused(lambda: sidecar.indices.get_mapping(index=other_index)) == 403
        assert refused(lambda: sidecar.indices.delete(index=other_index)) == 403
        assert refused(lambda: sidecar.index(index=other_index, id="x", body={"text": "overwritten"})) == 403
        assert refused(lambda: sidecar.search(index="_all", body={"query": {"match_all": {}}})) == 403
        assert refused(lambda: sidecar.cluster.put_settings(body={
            "persistent": {"cluster.routing.allocation.disk.threshold_enabled": False}})) == 403
        # The narrowed role: no cluster state (other indices' mappings and settings), no aliases of others.
        assert refused(lambda: sidecar.cluster.state()) == 403
        assert refused(lambda: sidecar.indices.get_alias(name=f"{other_index}-alias")) == 403
        assert refused(lambda: sidecar.transport.perform_request("GET", "/_plugins/_security/api/roles")) == 403
    finally:
        sidecar.close()
    admin = secured_node.client(secured_node.admin)
    try:
        assert admin.get(index=other_index, id="secret")["_source"] == {"text": "not for the sidecar"}
    finally:
        admin.close()


# ---- a wrong CA, a wrong password ---------------------------------------------------------------

@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory) -> str:
    """A CA of our own making, which did not sign the node's certificate."""
    folder = tmp_path_factory.mktemp("wrong-ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=wrong-ca",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "ca.pem")], check=True, capture_output=True)
    return str(folder / "ca.pem")


def test_a_wrong_ca_is_a_certificate_error_not_an_outage(secured_node, wrong_ca):
    store = secured_node.store(ca_certs=wrong_ca)
    try:
        for operation in (store.count, lambda: store.setup(DIM), lambda: store.upsert(make_documents(10)[0])):
            with pytest.raises(StoreError) as info:
                operation()
            # Not StoreUnavailable: retrying cannot fix a certificate (the API answers 502, not 503).
            assert not isinstance(info.value, StoreUnavailable)
            assert "certificate verify failed" in str(info.value)
            assert "SIDECAR_OPENSEARCH_CA_CERTS" in str(info.value)
    finally:
        store.close()


def test_the_cli_with_a_wrong_ca_stops_with_the_certificate_error(secured_node, shards, wrong_ca):
    # The timeout is the test's guard against a hang (retries of an error that cannot heal), not a speed check.
    env = {**os.environ, **sidecar_env(secured_node, f"it-secure-{uuid.uuid4().hex[:10]}",
                                       SIDECAR_OPENSEARCH_CA_CERTS=wrong_ca)}
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "index", str(shards)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "certificate verify failed" in result.stderr and "SIDECAR_OPENSEARCH_CA_CERTS" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_password_is_refused_naming_the_user(secured_node):
    store = secured_node.store(password="not-the-password")
    try:
        with pytest.raises(StoreError, match="401") as info:
            store.count()
        assert "clip-sidecar" in str(info.value) and "not-the-password" not in str(info.value)
    finally:
        store.close()



def test_an_alias_outside_the_roles_patterns_is_refused_naming_the_missing_permission(secured_node):
    store = secured_node.store(index=f"someone-else-{uuid.uuid4().hex[:10]}")
    try:
        with pytest.raises(StoreError, match=r"refused .* to user 'clip-sidecar': no permissions for \[indices:") as info:
            store.setup(DIM)
        assert "plugin_config/security/roles.yml" in str(info.value)
    finally:
        store.close()


# What docs/opensearch.md ("An existing cluster") gives `opensearch connect`'s user beside the role clip_sidecar:
# ml_full_access as OpenSearch's default roles.yml defines it (this node's security config has no such role),
# and the ingest pipeline, search pipeline and index template rights.
CONNECT_RIGHTS = {
    "cluster_permissions": ["cluster_monitor", "cluster:admin/opensearch/ml/*", "cluster:admin/ingest/pipeline/*",
                            "cluster:admin/search/pipeline/*", "indices:admin/index_template/*"],
    "index_permissions": [{"index_patterns": ["*"], "allowed_actions": ["indices_monitor"]}],
}


def test_connect_as_a_user_with_the_sidecars_role_and_the_documented_rights_gets_to_calling_the_sidecar(
        secured_node):
    # Nothing listens at the sidecar URL, so the run ends at its last step, OpenSearch calling the sidecar, after
    # every step that needs a right: the model group, connectors, models, pipelines, template and index settings.
    alias = f"it-secure-{uuid.uuid4().hex[:10]}"
    user, password = f"it-connect-{uuid.uuid4().hex[:8]}", f"Pw-{uuid.uuid4().hex}"
    security = "/_plugins/_security/api"
    store = secured_node.store(index=alias)
    admin = secured_node.client(secured_node.admin)
    try:
        store.claim(SIGNATURE)
        # One role of the user's own: clip_sidecar's permissions and the rights above (the shared mappings stay).
        sidecar_role = admin.transport.perform_request("GET", f"{security}/roles/clip_sidecar")["clip_sidecar"]
        admin.transport.perform_request("PUT", f"{security}/roles/{user}", body={
            key: sidecar_role[key] + CONNECT_RIGHTS[key] for key in ("cluster_permissions", "index_permissions")})
        admin.transport.perform_request("PUT", f"{security}/internalusers/{user}", body={"password": password})
        admin.transport.perform_request("PUT", f"{security}/rolesmapping/{user}", body={"users": [user]})
        result = CliRunner().invoke(main, [
            "-q", "opensearch", "connect", "--opensearch-url", secured_node.url, "--opensearch-index", alias,
            "--sidecar-url", f"http://127.0.0.1:{free_port()}", "--set-defaults"], env={
            "SIDECAR_OPENSEARCH_USER": user, "SIDECAR_OPENSEARCH_PASSWORD": password,
            "SIDECAR_OPENSEARCH_CA_CERTS": secured_node.ca_cert})
        assert "OpenSearch could not call the sidecar" in result.output, result.output
        assert "no permissions" not in result.output and "nothing was kept" in result.output
    finally:
        for kind in ("rolesmapping", "internalusers", "roles"):
            admin.transport.perform_request("DELETE", f"{security}/{kind}/{user}", params={"ignore": 404})
        admin.close()
        store.close()
        secured_node.drop(alias)
