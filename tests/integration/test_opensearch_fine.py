"""Fine-model vectors on a real OpenSearch node: stored beside each document, outside the HNSW graph."""

from __future__ import annotations

import numpy as np

from sidecar.retrieval.search import SearchOptions, search
from sidecar.types import Document
from tests.integration.conftest import DIM


def unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    vector = rng.standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_fine_vectors_round_trip_and_the_fine_stage_ranks_by_them(store):
    rng = np.random.default_rng(0)
    query, fine_query = unit(rng, DIM), np.array([1.0, 0.0, 0.0], dtype=np.float32)
    # Three near-duplicates for the coarse vector; the fine vectors order them the other way round.
    docs = []
    for i, (name, fine) in enumerate((("a", (0.1, 1, 0)), ("b", (0.5, 1, 0)), ("c", (1, 0.1, 0)))):
        near = query + 0.01 * i * unit(rng, DIM)
        docs.append(Document(id=name, vector=near / np.linalg.norm(near), text="badge",
                             fine_vector=np.array(fine, dtype=np.float32)))
    store.upsert(docs)
    fetched = {doc.id: doc for doc in store.fetch(["a", "b", "c"])}
    for doc in docs:
        np.testing.assert_array_equal(fetched[doc.id].fine_vector, doc.fine_vector)
    mapping = store.client.indices.get_mapping(index=store.alias)
    assert next(iter(mapping.values()))["mappings"]["properties"]["fine_vector"] == {"type": "binary"}
    result = search(store, vector=query, text=None, options=SearchOptions(mode="vector", k=3), fine_vector=fine_query)
    assert result.reranked and [h.id for h in result.hits][0] == "c"
    # A per-query ef_search reaches the lucene engine (a value below k is raised to k).
    assert {h.id for h in store.vector_search(query, 3, ef_search=3)} == {"a", "b", "c"}
