"""The app's quality checks as build_quality wires them: the recall monitor's shadow checks and the
hard-example checks run off the request path, neither waiting behind the other."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prometheus_client import REGISTRY

from sidecar.api.quality import build_quality
from sidecar.config import Settings
from sidecar.retrieval.search import SearchOptions, SearchResult
from sidecar.stores.embedded import EmbeddedStore
from tests.support import stored_copies, unit_vectors


def shadow_checks(outcome: str) -> float:
    return REGISTRY.get_sample_value("sidecar_shadow_checks_total", {"outcome": outcome}) or 0.0


def test_recall_checks_run_and_none_is_dropped_while_hard_example_checks_are_stuck(tmp_path: Path, monkeypatch):
    release = threading.Event()
    with EmbeddedStore(tmp_path / "store") as store:
        store.upsert(stored_copies(unit_vectors(50, seed=1), copies=1))
        # A hard-example check's BM25 search (the disagreement rule) hangs; the recall check uses none.
        monkeypatch.setattr(store, "text_search", lambda *args, **kwargs: release.wait(60) and [])
        settings = Settings(store_path=tmp_path / "store", quality_log_dir=str(tmp_path / "quality"),
                            monitor_fraction=1.0, hard_example_fraction=1.0, monitor_queue=4)
        quality = build_quality(settings, store)
        before = {outcome: shadow_checks(outcome) for outcome in ("checked", "dropped")}
        try:
            for offered, vector in enumerate(unit_vectors(12, seed=2), start=1):
                quality.observe_search(query_id="q", text="red circle", image=None, vector=vector,
                                       options=SearchOptions(mode="vector", candidates=10),
                                       result=SearchResult(hits=[], timings_s={}), model="")
                deadline = time.monotonic() + 10  # one at a time: the recall queue alone never fills
                while shadow_checks("checked") + shadow_checks("dropped") < sum(before.values()) + offered:
                    assert time.monotonic() < deadline, "a recall check neither ran nor was dropped"
                    time.sleep(0.01)
            assert shadow_checks("checked") - before["checked"] == 12
            assert shadow_checks("dropped") == before["dropped"]
        finally:
            release.set()
            quality.close()
