"""ANN recall against exact search counts an equally good hit under another id (the same image
stored twice) as found, and a hit that scores below the exact top K as a miss."""

from __future__ import annotations

from pathlib import Path

from sidecar.retrieval.evaluation import ann_recall, found_of_exact
from sidecar.stores.embedded import EmbeddedStore
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
