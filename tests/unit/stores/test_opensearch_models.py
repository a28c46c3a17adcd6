"""The OpenSearch store's recorded models: read from the mapping at most once per REFRESH_S, since the
server checks the model on every vector search; a claim compares with what is recorded now."""

from __future__ import annotations

import pytest

from sidecar.stores import opensearch
from sidecar.stores.base import ModelMismatchError
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.types import ModelSignature

SIGNATURE = ModelSignature(model="ViT-B-32", weights="laion2b", dim=512)
OTHER = ModelSignature(model="ViT-B-16", weights="laion2b", dim=512)


def recorded(signature: ModelSignature) -> dict:
    return {"model": signature.model, "weights": signature.weights, "dim": signature.dim}


@pytest.fixture
def store(monkeypatch):
    """A store whose mapping reads are counted and answered from `store.meta` (no cluster)."""
    store = OpenSearchStore(url="http://127.0.0.1:9", index="clip-test")
    store.meta, store.reads = recorded(SIGNATURE), 0

    def read_meta(index=None):
        store.reads += 1
        return dict(store.meta)

    monkeypatch.setattr(store, "_meta", read_meta)
    yield store
    store.close()


def test_signature_and_fine_signature_share_one_mapping_read_per_refresh(store, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(opensearch.time, "monotonic", lambda: clock[0])
    assert [store.signature() for _ in range(5)] == [SIGNATURE] * 5 and store.fine_signature() is None
    assert store.reads == 1
    store.meta = recorded(OTHER)  # another process's `index --rebuild` with another model
    clock[0] += opensearch.REFRESH_S
    assert store.signature() == OTHER and store.reads == 2


def test_a_claim_compares_with_the_mapping_of_now_not_the_cached_read(store, monkeypatch):
    monkeypatch.setattr(store, "_alias_indices", lambda: ["clip-test-1"])
    assert store.signature() == SIGNATURE
    store.meta = recorded(OTHER)
    with pytest.raises(ModelMismatchError, match="holds vectors of ViT-B-16"):
        store.claim(SIGNATURE)
