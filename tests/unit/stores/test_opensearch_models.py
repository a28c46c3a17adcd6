"""The OpenSearch store's recorded models: read from the mapping at most once per REFRESH_S, since the
server checks the model on every vector search, and at once where a search's hits or fetched documents come
from another index; a record of no model (an empty store) is read on every call; a claim compares with what
is recorded now."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.stores import opensearch
from sidecar.stores.base import ModelMismatchError, QueryModelMismatch
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
    store.meta, store.index, store.reads = recorded(SIGNATURE), "clip-test-v1", 0

    def read_mapping(index=None):
        store.reads += 1
        return store.index, {"_meta": dict(store.meta), "properties": {"vector": {"dimension": store.meta["dim"]}}}

    monkeypatch.setattr(store, "_mapping", read_mapping)
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


def test_a_record_of_no_model_is_read_again_on_every_call_until_a_model_is_recorded(store):
    store.meta = {"model": "", "weights": "", "dim": 512}  # the unclaimed index `setup` creates
    assert [store.signature() for _ in range(3)] == [None] * 3 and store.reads == 3
    store.meta = recorded(OTHER)  # another process's first `index` claims the store
    assert [store.signature() for _ in range(3)] == [OTHER] * 3 and store.reads == 4


def test_a_claim_compares_with_the_mapping_of_now_not_the_cached_read(store, monkeypatch):
    monkeypatch.setattr(store, "alias_indices", lambda: ["clip-test-1"])
    assert store.signature() == SIGNATURE
    store.meta = recorded(OTHER)
    with pytest.raises(ModelMismatchError, match="holds vectors of ViT-B-16"):
        store.claim(SIGNATURE)


def test_vector_searches_answered_by_the_index_read_cost_no_mapping_read(store, monkeypatch):
    monkeypatch.setattr(store, "_search", lambda body, **_: {"hits": {"hits": [
        {"_index": store.index, "_id": "d0", "_score": 1.5}]}})
    assert store.signature() == SIGNATURE and store.reads == 1
    for _ in range(5):
        assert [hit.id for hit in store.vector_search(np.ones(SIGNATURE.dim, dtype=np.float32), 1)] == ["d0"]
    assert store.reads == 1


def test_hits_of_another_index_recording_another_model_refuse_the_search_at_once(store, monkeypatch):
    monkeypatch.setattr(store, "_search", lambda body, **_: {"hits": {"hits": [
        {"_index": store.index, "_id": "d0", "_score": 1.5}]}})
    assert store.signature() == SIGNATURE
    store.meta, store.index = recorded(OTHER), "clip-test-v2"  # another model's rebuild moved the alias
    with pytest.raises(QueryModelMismatch, match="holds vectors of ViT-B-16 .*encoded by ViT-B-32 "):
        store.vector_search(np.ones(SIGNATURE.dim, dtype=np.float32), 1)
    assert store.reads == 2 and store.signature() == OTHER


def test_documents_fetched_from_another_index_than_the_records_read_the_record_again_at_once(store, monkeypatch):
    def mget(**_):
        return {"docs": [{"_index": store.index, "_id": "d0", "found": True, "_source": {"vector": [0.0] * 512}}]}

    monkeypatch.setattr(store.client, "mget", mget)
    assert store.signature() == SIGNATURE
    store.fetch(["d0"])
    assert store.reads == 1  # the common path: no mapping read
    store.meta, store.index = recorded(OTHER), "clip-test-v2"  # another model's rebuild moved the alias
    store.fetch(["d0"])
    assert store.reads == 2 and store.signature() == OTHER
