"""The Flask app on OpenSearch when things go wrong: a cluster nobody answers at (503 + Retry-After,
a real closed port), a filter the cluster refuses for its field's type (400 naming `filters`)."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.stores.base import StoreUnavailable
from sidecar.types import Document
from tests.integration.conftest import drop, make_store
from tests.support import free_port, png_b64

pytestmark = pytest.mark.integration


@pytest.fixture
def app_on(encoder, tmp_path):
    built = []

    def build(store):
        built.append(create_app(Settings(cache_dir=tmp_path / "cache", store="opensearch"), encoder=encoder,
                                store=store))
        return built[-1].test_client()

    yield build
    for app in built:
        state_of(app).encoding.close()


@pytest.mark.parametrize("body", [{"text": "red circle"}, {"text": "red circle", "mode": "bm25"},
                                  {"image": png_b64(), "exact": True}],
                         ids=["hybrid", "bm25", "image-exact"])
def test_a_cluster_nobody_answers_at_is_503_with_retry_after(app_on, body):
    # No mock: a loopback port with nothing listening refuses the connection for real.
    store = make_store(url=f"http://127.0.0.1:{free_port()}")
    try:
        response = app_on(store).post("/v1/search", json=body)
    finally:
        store.close()
    assert response.status_code == 503, response.json
    assert response.headers["Retry-After"] == "5"
    assert response.json["error"]["code"] == "store_unavailable"
    assert "cannot be reached" in response.json["error"]["message"]


def test_counting_on_a_cluster_nobody_answers_at_is_store_unavailable():
    # /v1/facets counts after its aggregation: a cluster lost in between answers 503, not 500.
    store = make_store(url=f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(StoreUnavailable, match="counting .* cannot be reached"):
            store.count()
    finally:
        store.close()


def test_a_filter_value_of_another_type_than_the_field_is_400_naming_filters(app_on, encoder, node):
    store = make_store()
    try:
        store.claim(encoder.signature)
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(4, encoder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert([Document(id=f"d{i}", vector=vectors[i], text=f"red circle {i}",
                               metadata={"size": i, "colour": "red"}, content_hash=f"h{i}") for i in range(4)])
        store.client.indices.refresh(index=store.alias)
        client = app_on(store)
        matching = client.post("/v1/search", json={"text": "red circle", "filters": {"size": [1, 2]}})
        assert matching.status_code == 200, matching.json
        assert sorted(h["id"] for h in matching.json["hits"]) == ["d1", "d2"]
        # "size" holds numbers in the index: OpenSearch refuses a word for it (400), which used to
        # surface as a 500.
        response = client.post("/v1/search", json={"text": "red circle", "filters": {"size": "big"}})
        assert response.status_code == 400, response.json
        assert response.json["error"]["message"].startswith("field 'filters' does not fit the types")
        assert "big" in response.json["error"]["message"]
    finally:
        drop(store)
