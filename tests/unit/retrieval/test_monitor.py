"""The live recall monitor counts an equally good hit under another id (the same image stored twice)
as found: on a store of duplicates an exhaustive search measures Recall@K 1.0."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sidecar.retrieval.monitor import BackgroundChecks, RecallCheck, RecallMonitor
from sidecar.stores.effort import SearchEffort
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


def test_queries_the_calibrated_effort_ran_exactly_are_not_checked_and_those_naming_an_ef_search_are(tmp_path: Path):
    # Exact search checked against exact search reads 1.0: a live "ANN recall" of a store that ran no ANN.
    checked: list[RecallCheck] = []
    with EmbeddedStore(tmp_path / "s", ef_search=10, target_recall=0.99, target_k=10) as store:
        store.upsert(stored_copies(unit_vectors(200, seed=5), copies=1))
        store.effort.save(SearchEffort(target_recall=0.99, k=10, depth=10, ef_search=None, recall=1.0, p50_ms=0.1,
                                       p95_ms=0.1, exact_p50_ms=0.1, exact_p95_ms=0.1, reason="as fast", queries=100,
                                       documents=200, calibrated_at=0.0))
        assert store.effort.exact(None)
        checks = BackgroundChecks(capacity=100)
        monitor = RecallMonitor(store, fraction=1.0, k=10, checks=checks, record=checked.append, seed=0)
        for query in unit_vectors(5, seed=6):
            monitor.offer(query, candidates=10)  # no ef_search: the store ran it exactly
        for query in unit_vectors(3, seed=7):
            monitor.offer(query, candidates=10, ef_search=50)  # its own ef_search: the HNSW ran
        assert checks.wait_idle(60)
        checks.close()
    assert [check.outcome for check in checked] == ["checked"] * 3


def test_a_failed_check_is_logged_naming_its_checks_and_error_and_the_next_check_still_runs(caplog):
    ran: list[str] = []

    def failing() -> None:
        raise OSError("disk full")

    checks = BackgroundChecks(capacity=10, name="hard-examples")
    assert checks.submit(failing) and checks.submit(lambda: ran.append("next"))
    assert checks.wait_idle(30)
    checks.close()
    assert ran == ["next"]
    assert "a background quality check (hard-examples) failed: OSError: disk full" in caplog.text


def test_closing_checks_whose_queue_is_full_behind_a_check_that_hangs_returns_within_its_timeout():
    # close() waited to queue its stop behind the full queue for as long as the running check took (a store that
    # hangs): a stopping worker outlived gunicorn's graceful timeout, killed before committing the rest of its app.
    running, release = threading.Event(), threading.Event()

    def hangs() -> None:
        running.set()
        release.wait(60)

    checks = BackgroundChecks(capacity=2)
    try:
        assert checks.submit(hangs) and running.wait(30)
        assert checks.submit(lambda: None) and checks.submit(lambda: None)
        assert not checks.submit(lambda: None)  # the queue is full behind it
        closing = threading.Thread(target=checks.close, kwargs={"timeout_s": 0.5}, daemon=True)
        started = time.monotonic()
        closing.start()
        closing.join(20)
        assert not closing.is_alive() and time.monotonic() - started < 5
    finally:
        release.set()


def test_filtered_queries_the_embedded_store_answers_exactly_are_not_checked_and_those_it_searches_by_hnsw_are(
        tmp_path: Path):
    # A filter matching at most exact_filter_rows documents is searched exactly: checked, it read as perfect recall.
    checked: list[RecallCheck] = []
    documents = stored_copies(unit_vectors(200, seed=8), copies=1)
    for i, document in enumerate(documents):
        document.metadata["half"] = "even" if i % 2 == 0 else "odd"
    with EmbeddedStore(tmp_path / "s", exact_filter_rows=150) as store:
        store.upsert(documents)
        checks = BackgroundChecks(capacity=100)
        monitor = RecallMonitor(store, fraction=1.0, k=10, checks=checks, record=checked.append, seed=0)
        for query in unit_vectors(4, seed=9):
            monitor.offer(query, candidates=10, filters={"half": ["even"]}, ef_search=50)  # 100 rows: exactly
        for query in unit_vectors(3, seed=10):
            monitor.offer(query, candidates=10, ef_search=50)  # all 200 rows: by HNSW
        assert checks.wait_idle(60)
        checks.close()
    assert [check.outcome for check in checked] == ["checked"] * 3
