"""What connect sends OpenSearch, without a cluster: the URLs each connector calls, what a rerun compares,
the options it refuses, and that docker compose's OpenSearch trusts those URLs."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from opensearchpy.exceptions import TransportError

from sidecar.stores.base import StoreError
from sidecar.stores.ml_commons import ConnectOptions, Names, _Cluster, _fingerprint, _sidecar_url
from sidecar.types import ModelSignature

SIGNATURE = ModelSignature(model="ViT-B-32", weights="sha256:0123abcd", dim=512)
ROOT = Path(__file__).parents[3]


@pytest.mark.parametrize(("role", "rerank", "path"), [("texts", "ids", "/v1/opensearch/embeddings/texts"),
                                                      ("text-image", "ids", "/v1/opensearch/embeddings/text-image"),
                                                      ("rerank", "ids", "/v1/opensearch/rerank/ids"),
                                                      ("rerank", "texts", "/v1/opensearch/rerank/texts")])
def test_every_connector_url_pins_the_indexs_model_and_the_rerank_by_id_one_its_index(role, rerank, path):
    url = urlsplit(_sidecar_url("http://sidecar:8080/", role, SIGNATURE, "products", rerank=rerank))
    assert (url.scheme, url.netloc, url.path) == ("http", "sidecar:8080", path)
    pins = {key: values[0] for key, values in parse_qs(url.query).items()}
    expected = {"model": "ViT-B-32", "weights": "sha256:0123abcd"}
    assert pins == ({**expected, "index": "products"} if path.endswith("/ids") else expected)


def test_the_fingerprint_a_rerun_compares_covers_the_credential_opensearch_never_shows():
    body = {"name": "c", "credential": {"api_key": "one"}, "parameters": {}}
    assert _fingerprint(body) == _fingerprint({"parameters": {}, "credential": {"api_key": "one"}, "name": "c"})
    assert _fingerprint(body) != _fingerprint({**body, "credential": {"api_key": "two"}})


def test_everything_is_named_after_the_alias():
    names = Names("products")
    assert [names.model(role) for role in names.roles] == ["products-texts", "products-text-image", "products-rerank"]
    assert (names.group, names.ingest_image, names.ingest_text, names.hybrid, names.hybrid_rerank, names.template) == (
        "products", "products-image", "products-text", "products-hybrid", "products-hybrid-rerank",
        "products-pipelines")


@pytest.mark.parametrize(("options", "message"), [
    ({"ingest_fields": "text"}, "ingest_fields 'text': choose one of image, image+text"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"rerank": "images"}, "rerank 'images': choose one of ids, texts, none"),
    ({"sidecar_url": "sidecar:8080"}, "sidecar_url must start with http:// or https://"),
    ({"api_key": ""}, "api_key must not be empty"),
])
def test_connect_options_refuse_what_opensearch_or_the_sidecar_would(options, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        ConnectOptions(**{"sidecar_url": "http://127.0.0.1:8080", **options})


@pytest.mark.parametrize(("url", "message"), [
    ("http://", "names no host"),
    ("http://127.0.0.1:99999", "has no valid port"),
    ("http://sidecar:port", "has no valid port"),
    # Each connector's URL is this one + its path + ?model=…: a query or fragment of its own broke them all.
    ("http://sidecar:8080?x=1", "has a query string or fragment"),
    ("http://sidecar:8080/#top", "has a query string or fragment"),
])
def test_a_sidecar_url_no_connector_url_can_be_made_of_is_refused_before_anything_is_made(url, message):
    with pytest.raises(ValueError, match=f"sidecar_url '{re.escape(url)}' {message}"):
        ConnectOptions(sidecar_url=url)
    for taken in ("http://sidecar:8080/", "https://sidecar.internal:8443/clip", "http://[::1]:8080"):
        assert ConnectOptions(sidecar_url=taken).sidecar_url == taken


def test_compose_trusts_every_connector_url_as_opensearch_splits_the_env_string():
    # The image turns the variable into `-Ekey=value`; OpenSearch's Settings.getAsList splits that one string on
    # commas and ml-commons keeps a URL only where a pattern matches all of it (Matcher.matches).
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    value = compose["services"]["opensearch"]["environment"]["plugins.ml_commons.trusted_connector_endpoints_regex"]
    patterns = [part.strip() for part in value.split(",")]
    for role, rerank in (("texts", "ids"), ("text-image", "ids"), ("rerank", "ids"), ("rerank", "texts")):
        url = _sidecar_url("http://sidecar:8080", role, SIGNATURE, "products", rerank=rerank)
        assert any(re.fullmatch(pattern, url) for pattern in patterns), (url, patterns)
    assert "$" not in value  # compose would take it for a variable


class _Restarted(_Cluster):
    """A cluster just restarted: ml-commons is redeploying the model by itself (DEPLOYING, then DEPLOYED).
    Scripted: the window lasts a second or two after a start, too short to meet for certain on a real node."""

    def __init__(self, states: list[str]):
        self.states = states
        self.calls: list[tuple[str, str]] = []

    def find(self, kind: str, *names: str) -> list[dict]:
        return [{"_id": "m1", "_source": {"name": names[0], "connector_id": "c1", "model_group_id": "g1"}}]

    def request(self, method: str, path: str, body=None, **kwargs) -> dict:
        self.calls.append((method, path))
        return {"model_state": self.states.pop(0) if len(self.states) > 1 else self.states[0]}


def test_a_rerun_while_opensearch_redeploys_a_model_waits_for_it_instead_of_a_second_deploy_that_fails():
    cluster = _Restarted(["DEPLOYING", "DEPLOYING", "DEPLOYED"])
    changes: list[str] = []
    body = {"name": "products-texts", "connector_id": "c1", "model_group_id": "g1"}
    assert cluster.ensure_model(body, changes) == "m1"
    assert ("POST", "/_plugins/_ml/models/m1/_deploy") not in cluster.calls
    assert changes == ["unchanged model products-texts (m1; OpenSearch was redeploying it)"]


class _Starting(_Cluster):
    """A node that has just started: ml-commons answers its first _predict 500 until it has read its key."""

    def __init__(self, first_error: str):
        self.store = None
        self.first_error = first_error
        self.calls = 0

    def request(self, method: str, path: str, body=None, **kwargs) -> dict:
        self.calls += 1
        if self.calls == 1:
            raise StoreError(self.first_error)
        return {"inference_results": [{"output": [{"data": [0.0] * SIGNATURE.dim}]}]}


def test_the_connect_check_waits_out_a_just_started_node_reading_its_key_and_refuses_anything_else_at_once():
    starting = _Starting("OpenSearch could not call the sidecar at http://s:8080 through model m (text-image): "
                         "500 Fetching master key timed out.")
    options = ConnectOptions(sidecar_url="http://s:8080")
    starting.check_models({"text-image": "m"}, signature=SIGNATURE, options=options)
    assert starting.calls == 2
    refused = _Starting("OpenSearch could not call the sidecar at http://s:8080 through model m (text-image): "
                        "500 Connection refused")
    with pytest.raises(StoreError, match="Connection refused"):
        refused.check_models({"text-image": "m"}, signature=SIGNATURE, options=options)
    assert refused.calls == 1


class _Refreshing(_Cluster):
    """ml-commons just after a connector's models were deleted: its DELETE answers 409 ("models are still using this
    connector") until the model index has refreshed."""

    def __init__(self, conflicts: int, *, status: int = 409):
        self.store = None
        self.conflicts, self.status = conflicts, status
        self.deletes = 0

    def request(self, method: str, path: str, body=None, **kwargs) -> dict:
        self.deletes += 1
        if self.deletes <= self.conflicts:
            error = TransportError(self.status, "status_exception", {"error": {"reason": "1 models are still using "
                                                                               "this connector"}})
            raise StoreError(f"{method} {path} failed: {self.status}") from error
        return {"result": "deleted"}


def test_a_connector_whose_models_were_just_deleted_is_deleted_once_ml_commons_has_caught_up():
    # On a quick machine the DELETE came within ml-commons' refresh of its model index: connect's rerun failed
    # with "409 3 models are still using this connector" about the probe models it had itself just deleted.
    refreshing = _Refreshing(conflicts=2)
    refreshing.delete_connector("c1")
    assert refreshing.deletes == 3
    other = _Refreshing(conflicts=1, status=403)  # any other refusal is said at once
    with pytest.raises(StoreError, match="failed: 403"):
        other.delete_connector("c1")
    assert other.deletes == 1
