"""The live recall monitor counts an equally good hit under another id (the same image stored twice)
as found: on a store of duplicates an exhaustive search measures Recall@K 1.0."""

from __future__ import annotations

from pathlib import Path

from sidecar.retrieval.monitor import BackgroundChecks, RecallCheck, RecallMonitor
from sidecar.stores.embedded import EmbeddedStore
from tests.support import stored_copies, unit_vectors


def test_live_recall_on_a_store_of_duplicates_is_one_at_an_exhaustive_ef_search(tmp_path: Path):
    checked: list[RecallCheck] = []
    with EmbeddedStore(tmp_path / "s") as store:
        store.upsert(stored_copies(unit_vectors(200, seed=3), copies=2))
        checks = BackgroundChecks(capacity=100)
        monitor = RecallMonitor(store, fraction=1.0, k=9, checks=checks, record=checked.append, seed=0)
        for query in unit_vectors(50, seed=4):
            monitor.offer(query, candidates=100, ef_search=1000)  # 1000 >= the 400 documents
        assert checks.wait_idle(60)
        checks.close()
    assert len(checked) == 50 and {check.outcome for check in checked} == {"checked"}
    assert sum(check.hits for check in checked) == sum(check.expected for check in checked) == 50 * 9
