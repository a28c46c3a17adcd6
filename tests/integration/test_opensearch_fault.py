"""Fault test: the node is stopped and restarted in the middle of a bulk load; a rerun converges exactly."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from sidecar.stores.base import StoreError
from tests.integration.conftest import SIGNATURE, drop, make_documents, make_store
from tests.support import ORIGINAL_ENVIRON

pytestmark = [pytest.mark.integration, pytest.mark.fault]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "opensearch-local"


def _node(command: str) -> None:
    subprocess.run([str(SCRIPT), command], check=True, timeout=300, capture_output=True, env=ORIGINAL_ENVIRON)


def test_node_restart_mid_load_then_rerun_gives_exact_count(node):
    # Few connection retries: the first load should give up while the node is down, so the
    # rerun (not the retry loop) is what brings the index to the exact count.
    s = make_store(number_of_replicas=0, connection_retries=2, initial_backoff=0.5, chunk_size=250)
    docs, _, _ = make_documents(20_000)
    outcome: list[object] = []
    try:
        s.claim(SIGNATURE)

        def load() -> None:
            try:
                outcome.append(s.upsert(docs))
            except StoreError as exc:
                outcome.append(exc)

        loader = threading.Thread(target=load)
        loader.start()
        deadline = time.monotonic() + 120
        # Stop once part of the load is in: the count is visible after the first refresh or flush.
        while time.monotonic() < deadline and loader.is_alive():
            stats = s.client.indices.stats(index=s.alias, metric="indexing")
            if stats["_all"]["primaries"]["indexing"]["index_total"] >= 2000:
                break
            time.sleep(0.2)
        assert loader.is_alive(), "the load finished before the node could be stopped; raise the doc count"
        _node("stop")
        loader.join(timeout=300)
        _node("start")
        assert outcome and isinstance(outcome[0], StoreError), f"first load should have failed, got {outcome}"
        assert s.upsert(docs) == len(docs)
        assert s.count() == len({d.id for d in docs})
        settings = next(iter(s.client.indices.get_settings(index=s.alias).values()))["settings"]["index"]
        assert settings["refresh_interval"] == "1s" and settings["number_of_replicas"] == "0"
    finally:
        _node("start")
        drop(s)
