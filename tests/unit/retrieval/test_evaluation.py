"""ANN recall against exact search counts an equally good hit under another id (the same image
stored twice) as found, and a hit that scores below the exact top K as a miss; `eval --ann` measures it on
queries as far from the data as new ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sidecar.retrieval.evaluation import ann_recall, found_of_exact
from sidecar.stores.effort import SearchEffort
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document
from tests.support import stored_copies, unit_vectors


def test_a_duplicate_of_the_kth_hit_counts_as_found_and_a_lower_hit_as_missed(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s") as store:
        store.upsert(stored_copies(unit_vectors(100, seed=0), copies=2))
        query = unit_vectors(1, seed=1)[0]
        exact = store.vector_search(query, 9, exact=True)
        deeper = store.vector_search(query, 12, exact=True)
    last = exact[-1]
    twin = next(hit for hit in deeper if hit.id != last.id and hit.id[1:] == last.id[1:])
    assert twin.id not in {hit.id for hit in exact}  # the pair straddles the top 9
    assert found_of_exact([*exact[:-1], twin], exact) == 9  # the K-th's twin instead of it: as good
    below = next(hit for hit in deeper if hit.score < last.score - 1e-3)
    assert found_of_exact([*exact[:-1], below], exact) == 8  # a lower hit instead of the K-th: a miss


def test_ann_recall_on_a_store_of_duplicates_is_one_at_an_exhaustive_ef_search(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s", ef_search=1000) as store:  # 1000 >= the 400 documents
        store.upsert(stored_copies(unit_vectors(200, seed=2), copies=2))
        assert ann_recall(store, queries=100, k=9).recall == 1.0


def test_ann_recall_reads_within_a_tenth_of_the_recall_new_queries_get_not_the_stored_vectors_easier_one(
        tmp_path: Path):
    # Stored vectors as queries (each a node of the graph, found by the graph around it) read 0.46 where
    # new queries got 0.24 at this low effort.
    with EmbeddedStore(tmp_path / "s", ef_search=10, m=4, ef_construction=20) as store:
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(unit_vectors(3000, seed=3))])
        new_queries = unit_vectors(200, seed=4)
        fresh = np.mean([found_of_exact(store.vector_search(q, 10), store.vector_search(q, 10, exact=True)) / 10
                         for q in new_queries])
        measured = ann_recall(store, queries=200, k=10).recall
    assert fresh < 0.5  # an effort that misses, or there is nothing to tell apart
    assert abs(measured - fresh) < 0.1


def test_where_the_calibration_gives_queries_exact_search_ann_recall_measures_the_hnsw_and_says_so(tmp_path: Path):
    # It searched without an ef_search, so exact search against exact search: 1.0000, "HNSW vs exact".
    with EmbeddedStore(tmp_path / "s", ef_search=10, m=4, ef_construction=20, target_recall=0.99,
                       target_k=10) as store:
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(unit_vectors(3000, seed=3))])
        store.effort.save(SearchEffort(target_recall=0.99, k=10, depth=10, ef_search=None, recall=1.0, p50_ms=0.1,
                                       p95_ms=0.1, exact_p50_ms=0.1, exact_p95_ms=0.1, reason="as fast", queries=100,
                                       documents=3000, calibrated_at=0.0))
        assert store.effort.exact(None)
        report = ann_recall(store, queries=100, k=10)
    assert report.recall < 0.5 and report.ef_search == 10 and report.queries_get_exact
    assert "at efSearch 10" in report.describe() and "get exact search on this store" in report.describe()
