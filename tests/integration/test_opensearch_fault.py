"""Fault test: the node is stopped and restarted in the middle of a bulk load; a rerun converges exactly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sidecar.stores.base import StoreError
from tests.integration.conftest import SIGNATURE, drop, load_in_background, make_documents, make_store
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
    try:
        s.claim(SIGNATURE)
        # Stop once part of the load is in: the count is visible after the first refresh or flush.
        loader, outcome = load_in_background(s, docs)
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
