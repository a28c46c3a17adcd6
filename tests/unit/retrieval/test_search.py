"""Two-stage retrieval over the embedded store: the coarse stage's hybrid ranking."""

from __future__ import annotations

import pytest

from sidecar.retrieval.search import SearchOptions, search
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import ModelSignature
from tests.support import tied_captions

SIGNATURE = ModelSignature(model="synthetic", weights="ties", dim=32)


@pytest.mark.parametrize("fusion", ["minmax", "zscore", "rrf"])
def test_hybrid_with_one_list_weighted_zero_ranks_exactly_as_the_other_list_ties_included(tmp_path, fusion):
    docs, query = tied_captions(dim=SIGNATURE.dim)
    with EmbeddedStore(tmp_path / "store") as store:
        store.claim(SIGNATURE)
        store.upsert(docs)
        n = len(docs)
        bm25_hits = store.text_search("red", n)
        bm25, vector = [hit.id for hit in bm25_hits], [hit.id for hit in store.vector_search(query, n)]
        assert len({hit.score for hit in bm25_hits}) < len(bm25_hits) - 3  # the five captions tie

        def ranked(weights: tuple[float, float]) -> list[str]:
            options = SearchOptions(mode="hybrid", k=n, candidates=n, fusion=fusion, weights=weights, rerank=False)
            return [hit.id for hit in search(store, vector=query, text="red", options=options).hits]

        # BM25's ranking (its ties in its own order), then what only the vector side found, in its order.
        assert ranked((0, 1)) == bm25 + [doc_id for doc_id in vector if doc_id not in bm25]
        assert ranked((1, 0)) == vector
