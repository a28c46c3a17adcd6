"""Fine-model vectors on a real OpenSearch node: stored beside each document, outside the HNSW graph."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.retrieval.search import SearchOptions, search, uses_native_hybrid
from sidecar.stores.base import ModelMismatchError
from sidecar.types import NO_VECTOR, Document, ModelSignature
from tests.integration.conftest import DIM, SIGNATURE, make_store

FINE = ModelSignature(model="strong", weights="w1", dim=3)  # the fine model of near_duplicates' fine vectors


def unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    vector = rng.standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def near_duplicates(rng: np.random.Generator, query: np.ndarray) -> list[Document]:
    """Three near-duplicates for the coarse vector; the fine vectors order them the other way round."""
    docs = []
    for i, (name, fine) in enumerate((("a", (0.1, 1, 0)), ("b", (0.5, 1, 0)), ("c", (1, 0.1, 0)))):
        near = query + 0.01 * i * unit(rng, DIM)
        docs.append(Document(id=name, vector=near / np.linalg.norm(near), text=f"badge {name}",
                             metadata={"kind": "badge"}, fine_vector=np.array(fine, dtype=np.float32)))
    return docs


def test_fine_vectors_round_trip_and_the_fine_stage_ranks_by_them(store):
    rng = np.random.default_rng(0)
    query, fine_query = unit(rng, DIM), np.array([1.0, 0.0, 0.0], dtype=np.float32)
    docs = near_duplicates(rng, query)
    store.upsert(docs)
    fetched = {doc.id: doc for doc in store.fetch(["a", "b", "c"])}
    for doc in docs:
        np.testing.assert_array_equal(fetched[doc.id].fine_vector, doc.fine_vector)
    mapping = store.client.indices.get_mapping(index=store.alias)
    assert next(iter(mapping.values()))["mappings"]["properties"]["fine_vector"] == {"type": "binary"}
    result = search(store, vector=query, text=None, options=SearchOptions(mode="vector", k=3), fine_vector=fine_query,
                    fine_model=FINE)
    assert result.reranked and [h.id for h in result.hits][0] == "c"
    # A per-query ef_search reaches the lucene engine (a value below k is raised to k).
    assert {h.id for h in store.vector_search(query, 3, ef_search=3)} == {"a", "b", "c"}


def test_a_fetch_without_vectors_keeps_text_metadata_and_fine_vectors(store):
    docs = near_duplicates(np.random.default_rng(1), unit(np.random.default_rng(2), DIM))
    store.upsert(docs)
    for doc, bare in zip(docs, store.fetch(["a", "b", "c"], vectors=False)):
        assert bare.vector is NO_VECTOR
        assert (bare.id, bare.text, dict(bare.metadata)) == (doc.id, doc.text, dict(doc.metadata))
        np.testing.assert_array_equal(bare.fine_vector, doc.fine_vector)


def test_reranked_hybrid_hits_carry_exact_vector_scores_natively_and_in_python(store):
    # The fine stage reads its candidates without their vectors; the native hybrid's hits get their
    # vector scores from a fetch of the hits shown.
    rng = np.random.default_rng(3)
    query, fine_query = unit(rng, DIM), np.array([1.0, 0.0, 0.0], dtype=np.float32)
    docs = near_duplicates(rng, query)
    store.upsert(docs)
    for native in (True, False):
        options = SearchOptions(mode="hybrid", k=3, native_hybrid=native)
        assert uses_native_hybrid(store, options) is native
        result = search(store, vector=query, text="badge", options=options, fine_vector=fine_query, fine_model=FINE)
        assert result.reranked and [h.id for h in result.hits][0] == "c"
        for hit in result.hits:
            stored = next(doc for doc in docs if doc.id == hit.id).vector
            assert hit.scores["vector"] == pytest.approx(float(stored @ query), abs=1e-5)


def test_the_fine_model_is_recorded_in_meta_and_another_of_the_same_size_is_refused_and_skips_the_fine_stage(store):
    rng = np.random.default_rng(4)
    query, fine_query = unit(rng, DIM), np.array([1.0, 0.0, 0.0], dtype=np.float32)
    docs = near_duplicates(rng, query)
    store.claim(SIGNATURE, fine_signature=FINE)
    store.upsert(docs)
    store.claim(SIGNATURE)  # a claim naming no fine model (setup) keeps the recorded one
    other = ModelSignature(model="other", weights="w2", dim=FINE.dim)
    with pytest.raises(ModelMismatchError, match="fine-model vectors of strong .*refusing fine-model vectors of other"):
        store.claim(SIGNATURE, fine_signature=other)
    reader = make_store(index=store.alias)  # another process: the record is in the index's _meta
    try:
        assert reader.fine_signature() == FINE
    finally:
        reader.close()
    options = SearchOptions(mode="vector", k=3)
    coarse = [h.id for h in search(store, vector=query, text=None, options=SearchOptions(mode="vector", k=3,
                                                                                          rerank=False)).hits]
    skipped = search(store, vector=query, text=None, options=options, fine_vector=fine_query, fine_model=other)
    assert not skipped.reranked and [h.id for h in skipped.hits] == coarse
    assert skipped.rerank_skipped.startswith(f"the candidates' fine vectors were embedded with {FINE.describe()}")
    # A rebuild records the fine model of the documents it loads, and this process reads the new index's.
    store.rebuild(docs, signature=SIGNATURE, fine_signature=other)
    assert store.fine_signature() == other
    assert search(store, vector=query, text=None, options=options, fine_vector=fine_query, fine_model=other).reranked
