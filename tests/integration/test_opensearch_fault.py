"""Fault test: the node is stopped and restarted in the middle of a bulk load; a rerun converges exactly.

The test stops and restarts a node of its own (OPENSEARCH_FAULT_PORT, default 9590; node folder `fault`
beside the default node's), started here unless one already answers there and stopped at the end if it was
started here: the node the other tests share is never the one restarted, whichever URL they were given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConnectionError as OSConnectionError

from sidecar.stores.base import StoreError
from tests.integration.conftest import SIGNATURE, drop, load_in_background, make_documents, make_store
from tests.support import ORIGINAL_ENVIRON

pytestmark = [pytest.mark.integration, pytest.mark.fault]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "opensearch-local"
PORT = int(os.environ.get("OPENSEARCH_FAULT_PORT", "9590"))
URL = f"http://127.0.0.1:{PORT}"
# No ml-commons: the load is all this node serves, and it starts in half the time without it.
ENV = {**ORIGINAL_ENVIRON, "OPENSEARCH_PORT": str(PORT), "OPENSEARCH_NODE_NAME": "fault", "OPENSEARCH_WITH_ML": "0"}


def _node(command: str) -> None:
    done = subprocess.run([str(SCRIPT), command], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"opensearch-local {command}: {done.stderr[-2000:]}"


def _answers() -> bool:
    client = OpenSearch(hosts=[URL], timeout=10, max_retries=0)
    try:
        client.cluster.health(request_timeout=10)
        return True
    except OSConnectionError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def fault_node() -> Iterator[str]:
    started = not _answers()
    if started:
        _node("start")
    try:
        yield URL
    finally:
        if started:
            _node("stop")


def test_node_restart_mid_load_then_rerun_gives_exact_count(fault_node):
    # Few connection retries: the first load should give up while the node is down, so the
    # rerun (not the retry loop) is what brings the index to the exact count.
    s = make_store(url=fault_node, user="", password="", number_of_replicas=0, connection_retries=2,
                   initial_backoff=0.5, chunk_size=250)
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
