"""Bulk loading against real nodes: per-item 429s retried, resume by acknowledged ids after a dropped
connection, settings relaxed once per `index` run, the load lock between `--rebuild` and `index`."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
from click.testing import CliRunner
from opensearchpy import OpenSearch

from sidecar.cli import main
from sidecar.config import Settings
from sidecar.ingest.indexing import index_shards, rebuild_index
from sidecar.stores import open_store
from sidecar.stores.base import StoreLocked, StoreUnavailable
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.stores.opensearch_lock import LOCK_ID
from sidecar.types import Document, ModelSignature
from tests.integration.conftest import (
    SIGNATURE,
    URL,
    cli,
    drop,
    make_documents,
    make_store,
    opensearch_args,
)
from tests.support import ORIGINAL_ENVIRON, write_shards

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "opensearch-local"
OVERLOADED_PORT = 9670


# --- a second node whose write pool answers 429 ---------------------------------------------------


@pytest.fixture(scope="module")
def overloaded_node(node: str) -> Iterator[str]:
    """A node of our own (not the shared one) with one write thread and a queue of one: a bulk
    request over several shards gets some shard requests rejected, so some items answer 429
    (es_rejected_execution_exception) while others are written — what a busy cluster does."""
    env = {**ORIGINAL_ENVIRON, "OPENSEARCH_PORT": str(OVERLOADED_PORT), "OPENSEARCH_NODE_NAME": "node-overloaded",
           "OPENSEARCH_WITH_ML": "0", "OPENSEARCH_HEAP": "512m",
           "OPENSEARCH_EXTRA_SETTINGS": "thread_pool.write.size: 1\nthread_pool.write.queue_size: 1"}
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.fail(f"could not start the overloaded node: {started.stderr[-2000:]}")
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=300)


def rejected_so_far(url: str) -> int:
    client = OpenSearch(hosts=[url])
    try:
        nodes = client.nodes.stats(metric="thread_pool")["nodes"].values()
        return sum(n["thread_pool"]["write"]["rejected"] for n in nodes)
    finally:
        client.close()


def assert_holds_exactly(store: OpenSearchStore, docs: list[Document]) -> None:
    store.client.indices.refresh(index=store.alias)
    assert store.count() == len(docs)
    assert store.content_hashes() == {d.id: d.content_hash for d in docs}


def test_per_item_429s_from_a_real_node_are_retried_until_every_document_is_written(overloaded_node):
    store = make_store(url=overloaded_node, number_of_shards=3, number_of_replicas=0, chunk_size=200,
                       max_retries=3, retry_rounds=10, initial_backoff=0.02)
    docs, _, _ = make_documents(3000, seed=3)
    before = rejected_so_far(overloaded_node)
    try:
        store.claim(SIGNATURE)
        assert store.upsert(docs) == 3000
        assert rejected_so_far(overloaded_node) > before, "the node rejected nothing: the test proves nothing"
        assert_holds_exactly(store, docs)
    finally:
        drop(store)


class DroppingProxy:
    """A TCP proxy to a node that, once `drop_after` bulk requests have passed, cuts every
    connection and refuses new ones for `down_s` seconds: a dropped connection in mid-load."""

    def __init__(self, target_port: int, *, drop_after: int, down_s: float, on_drop=lambda: None):
        self.target_port = target_port
        self.drop_after = drop_after
        self.down_s = down_s
        self.on_drop = on_drop
        self.bulk_requests = 0
        self.drops = 0
        self.down_until = 0.0
        self.refused: list[bytes] = []  # the request line of each connection refused while down
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                self._refuse(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        client.settimeout(5)
        try:
            self.refused.append(client.recv(65536).split(b"\r\n", 1)[0])
        except OSError:
            pass
        finally:
            client.close()

    def _pipe(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and b"POST /_bulk" in data:
                    with self.lock:
                        self.bulk_requests += data.count(b"POST /_bulk")
                        cut = self.drops == 0 and self.bulk_requests > self.drop_after
                    if cut:
                        self._cut()
                        return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                sock.close()

    def _cut(self) -> None:
        self.on_drop()
        with self.lock:
            self.drops += 1
            self.down_until = time.monotonic() + self.down_s
            for sock in self.sockets:
                sock.close()
            self.sockets.clear()

    def close(self) -> None:
        self.server.close()


def test_a_load_resumes_by_acknowledged_ids_after_a_dropped_connection(overloaded_node, caplog):
    # No retries inside a chunk: every rejected item waits in the store's own queue, so when the
    # connection drops, the acknowledged ids are not a prefix of the input; a resume "after the
    # last acknowledged document" would skip the rejected ones.
    rejected_at_drop: list[int] = []
    before = rejected_so_far(overloaded_node)
    proxy = DroppingProxy(OVERLOADED_PORT, drop_after=6, down_s=1.0,
                          on_drop=lambda: rejected_at_drop.append(rejected_so_far(overloaded_node) - before))
    store = make_store(url=f"http://127.0.0.1:{proxy.port}", number_of_shards=3, number_of_replicas=0, chunk_size=200,
                       max_retries=0, retry_rounds=20, initial_backoff=0.5, connection_retries=5)
    docs, _, _ = make_documents(3000, seed=4)
    try:
        store.claim(SIGNATURE)
        with caplog.at_level(logging.WARNING, logger="sidecar.stores.opensearch"):
            assert store.upsert(docs) == 3000
        assert proxy.drops == 1 and rejected_at_drop and rejected_at_drop[0] > 0, \
            "the drop must come after the node rejected items (out-of-order acknowledgements)"
        assert any("unacknowledged operations" in r.getMessage() for r in caplog.records)
        assert any("rejected with 429" in r.getMessage() for r in caplog.records)
        assert_holds_exactly(store, docs)
    finally:
        proxy.close()
        drop(store)


@pytest.mark.parametrize("operation", ["upsert", "rebuild"])
def test_a_load_that_loses_the_cluster_fails_without_another_round_of_retries_to_restore_its_settings(
        node, operation, caplog):
    # The node stays away once 3 bulk requests have passed. The load spends its connection retries on it; restoring
    # the relaxed settings then is one attempt (the client's own retries of it included), not another round of
    # connection_retries with backoff, which kept a CLI `index` waiting minutes before it said anything.
    proxy = DroppingProxy(urlsplit(node).port, drop_after=3, down_s=3600)
    store = make_store(url=f"http://127.0.0.1:{proxy.port}", number_of_replicas=1, chunk_size=200,
                       large_load_threshold=100, connection_retries=2, initial_backoff=0.01,
                       lock_stale_s=3600, lock_heartbeat_s=3000)
    docs, _, _ = make_documents(3000, seed=5)
    try:
        store.claim(SIGNATURE)
        with caplog.at_level(logging.WARNING, logger="sidecar.stores.opensearch"), \
                pytest.raises(StoreUnavailable, match=r"lost the cluster .*; rerun once it answers"):
            if operation == "upsert":
                store.upsert(docs)
            else:
                store.rebuild(iter(docs), signature=SIGNATURE)
        assert proxy.drops == 1
        restore_attempts = [line for line in proxy.refused if b"/_flush" in line or b"/_settings" in line]
        assert len(restore_attempts) <= store.client.transport.max_retries + 1, restore_attempts
        not_restored = [r for r in caplog.records if r.name == "sidecar.stores.opensearch" and "could not" in r.getMessage()]
        assert not_restored and all(r.exc_info is None and "store repair" in r.getMessage() for r in not_restored)
    finally:
        proxy.close()
        store.close()
        drop(make_store(index=store.alias))


# --- one load session per index run -------------------------------------------------------------


def test_the_index_progress_bar_advances_per_chunk_acknowledged_within_one_large_upsert(
        node, tmp_path, indexing_progress):
    docs, _, _ = make_documents(3000, seed=7)
    shards = write_shards(tmp_path / "shards", docs, SIGNATURE)
    store = make_store(chunk_size=500)
    try:
        summary = index_shards(store, shards, batch_size=10_000, progress=True)  # the 3000 in one upsert
        assert summary.written == 3000
        assert {500, 1000, 1500, 2000, 2500} <= set(indexing_progress) and indexing_progress[-1] == 3000
    finally:
        drop(store)


def test_the_rebuild_progress_bar_advances_per_chunk_acknowledged_not_per_shard_batch_pulled(
        node, tmp_path, indexing_progress):
    docs, _, _ = make_documents(3000, seed=7)
    shards = write_shards(tmp_path / "shards", docs, SIGNATURE)
    store = make_store(chunk_size=500)
    try:
        summary = rebuild_index(store, shards, batch_size=10_000, progress=True)  # the 3000 in one shard batch
        assert summary.written == 3000
        assert {500, 1000, 1500, 2000, 2500} <= set(indexing_progress) and indexing_progress[-1] == 3000
    finally:
        drop(store)


def settings_version(store: OpenSearchStore) -> int:
    (name,) = store.alias_indices()
    state = store.client.cluster.state(metric="metadata", index=name)
    return int(state["metadata"]["indices"][name]["settings_version"])


def test_an_index_run_relaxes_refresh_and_replicas_once_not_per_batch(node, tmp_path):
    docs, _, _ = make_documents(3000, seed=6)
    shards = write_shards(tmp_path / "shards", docs, SIGNATURE)
    store = make_store(large_load_threshold=1000, number_of_replicas=1)
    try:
        store.setup(SIGNATURE.dim)
        before = settings_version(store)
        # Six upsert batches of 500, each below the threshold; the run as a whole is above it.
        summary = index_shards(store, shards, batch_size=500, progress=False)
        assert summary.written == 3000
        assert settings_version(store) - before == 2  # relaxed once, restored once
        settings = next(iter(store.client.indices.get_settings(index=store.alias).values()))["settings"]["index"]
        assert settings["refresh_interval"] == "1s" and settings["number_of_replicas"] == "1"
        assert_holds_exactly(store, docs)
    finally:
        drop(store)


# --- the load lock -------------------------------------------------------------------------------


def index_cli(shards: Path, alias: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar.cli", "-q", "index", str(shards), "--store", "opensearch",
            "--opensearch-url", URL, "--opensearch-index", alias, *extra]


def test_an_index_run_beside_a_rebuild_is_refused_or_waits_and_its_writes_survive_the_swap(node, tmp_path):
    docs, _, _ = make_documents(400, seed=7)
    shards = write_shards(tmp_path / "shards", docs, SIGNATURE)
    store = make_store()
    gate, rebuilding = threading.Event(), threading.Event()
    outcome: list[object] = []

    def slow_documents() -> Iterator[Document]:
        yield from docs[:200]
        rebuilding.set()
        gate.wait(120)  # the rebuild holds the lock until the test lets it finish

    def rebuild() -> None:
        try:
            outcome.append(store.rebuild(slow_documents(), signature=SIGNATURE))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome.append(exc)

    try:
        store.claim(SIGNATURE)
        store.upsert(docs[:10])
        rebuilder = threading.Thread(target=rebuild)
        rebuilder.start()
        assert rebuilding.wait(120)
        refused = CliRunner().invoke(main, ["-q", "index", str(shards), "--store", "opensearch", "--opensearch-url",
                                            URL, "--opensearch-index", store.alias])
        assert refused.exit_code == 1
        assert f"{store.alias} is locked by a rebuild run by {socket.gethostname()} pid {os.getpid()}" in refused.output
        assert "--wait-for-lock" in refused.output
        waiting = subprocess.Popen(index_cli(shards, store.alias, "--wait-for-lock", "300"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # let it find the lock held (it waits; no timing is asserted)
        gate.set()
        rebuilder.join(120)
        stdout, stderr = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, stderr
        assert isinstance(outcome[0], str), outcome
        assert "store now holds 400 documents" in stdout
        assert_holds_exactly(store, docs)  # the index run's writes went to the index the alias now names
    finally:
        gate.set()
        drop(store)


def test_a_stale_lock_is_broken_with_a_warning_and_a_live_one_is_named(node, caplog):
    store = make_store()
    docs, _, _ = make_documents(20, seed=8)
    try:
        store.claim(SIGNATURE)
        store.upsert(docs[:5])  # creates the lock index
        silent = {"operation": "index", "owner": "elsewhere pid 1", "host": "elsewhere", "pid": 1, "token": "t",
                  "started_at": time.time() - 3600, "heartbeat_at": time.time() - 3600}
        store.client.index(index=store.lock_index, id=LOCK_ID, body=silent, refresh=True)
        assert any("stale" in note for note in store.check().notes)
        with caplog.at_level(logging.WARNING, logger="sidecar.stores.opensearch"):
            assert store.upsert(docs) == 20
        assert any("breaking the load lock" in r.getMessage() and "no heartbeat for" in r.getMessage()
                   for r in caplog.records)
        live = {**silent, "heartbeat_at": time.time()}
        store.client.index(index=store.lock_index, id=LOCK_ID, body=live, refresh=True)
        with pytest.raises(StoreLocked, match="locked by an index run by elsewhere pid 1"):
            store.upsert(docs)
        assert any("held by the index of elsewhere pid 1" in note for note in store.check().notes)
    finally:
        drop(store)


def test_check_reports_what_an_interrupted_load_left_and_repair_restores_it(node):
    store = make_store(large_load_threshold=10, number_of_replicas=1)
    try:
        store.claim(SIGNATURE)
        (index,) = store.alias_indices()
        store._relax_settings(index)  # what a load killed with its process leaves behind
        orphan = store._new_index_name()
        store._create_index(orphan, dim=SIGNATURE.dim, signature=SIGNATURE)  # an interrupted rebuild's index
        report = store.check()
        assert not report.clean and any("still runs with the settings an interrupted load relaxed" in p
                                        for p in report.problems)
        assert any(orphan in note for note in report.notes)
        repaired = store.repair()
        assert any("restored" in a for a in repaired.actions) and any(orphan in a for a in repaired.actions)
        assert store.check().clean and store.check().notes == []
        settings = next(iter(store.client.indices.get_settings(index=index).values()))["settings"]["index"]
        assert settings["refresh_interval"] == "1s" and settings["number_of_replicas"] == "1"
    finally:
        drop(store)


# A rebuild that SIGKILLs itself once two batches of 100 are in its new index: killed mid-bulk, as by `kill -9`.
KILLED_REBUILD = """
import os, signal, sys
import sidecar.stores.opensearch as opensearch
from tests.integration.conftest import SIGNATURE, make_documents

opensearch.REBUILD_BATCH = 100
docs, _, _ = make_documents(400)

def documents():
    yield from docs[:250]
    os.kill(os.getpid(), signal.SIGKILL)

opensearch.OpenSearchStore(url=sys.argv[1], index=sys.argv[2]).rebuild(documents(), signature=SIGNATURE)
"""


def test_the_rerun_of_a_rebuild_killed_mid_bulk_deletes_the_index_it_left_and_says_so(node, caplog):
    store = make_store()
    neighbour = make_store(index=f"{store.alias}-vision")  # an alias whose versions match `<alias>-v*` too
    docs, _, _ = make_documents(400)
    try:
        store.claim(SIGNATURE)
        store.upsert(docs[:300])
        neighbour.claim(SIGNATURE)
        killed = subprocess.run([sys.executable, "-c", KILLED_REBUILD, URL, store.alias], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        (serving,) = store.alias_indices()
        left = sorted(set(store.client.indices.get(index=f"{store.alias}-v1*")) - {serving})
        assert len(left) == 1
        store.client.indices.refresh(index=left[0])  # the killed run had relaxed its refresh
        assert store.client.count(index=left[0])["count"] == 200  # what it wrote
        assert store.count() == 300  # searches still read the index it was replacing, whole
        with caplog.at_level(logging.WARNING, logger="sidecar.stores.opensearch"):
            new_index = store.rebuild(iter(docs), signature=SIGNATURE)
        assert any(f"deleted {left[0]}, a versioned index no alias names" in r.getMessage() for r in caplog.records)
        assert store.client.indices.get(index=f"{store.alias}-v1*").keys() == {new_index}
        assert store.count() == 400
        assert neighbour.count() == 0 and len(neighbour.alias_indices()) == 1  # another alias's index is not ours
    finally:
        drop(neighbour)
        drop(store)


def test_check_and_repair_leave_the_index_of_an_alias_named_like_a_version_of_this_one_alone(node):
    store = make_store()
    neighbour = make_store(index=f"{store.alias}-vision")
    try:
        store.claim(SIGNATURE)
        neighbour.claim(SIGNATURE)
        (theirs,) = neighbour.alias_indices()
        assert store.check().notes == []
        assert store.repair().actions == []
        assert neighbour.alias_indices() == [theirs] and neighbour.signature() == SIGNATURE
    finally:
        drop(neighbour)
        drop(store)


def test_a_small_load_after_a_killed_large_one_restores_the_settings_it_left_relaxed(node, caplog):
    store = make_store(large_load_threshold=100, number_of_replicas=1)
    docs, _, _ = make_documents(20, seed=9)
    try:
        store.claim(SIGNATURE)
        (index,) = store.alias_indices()
        store._relax_settings(index)  # what a large load killed with its process leaves behind
        with caplog.at_level(logging.WARNING, logger="sidecar.stores.opensearch"):
            assert store.upsert(docs) == 20  # under large_load_threshold: it relaxes nothing itself
        assert any(f"{index} still runs with the settings an interrupted load relaxed" in r.getMessage()
                   for r in caplog.records)
        settings = next(iter(store.client.indices.get_settings(index=index).values()))["settings"]["index"]
        assert (settings["refresh_interval"], settings["number_of_replicas"]) == ("1s", "1")
        assert store.check().clean
    finally:
        drop(store)


def unit_documents(n: int, dim: int) -> list[Document]:
    """`n` documents of random unit `dim`-d vectors: the size of whichever model the index was set up for."""
    vectors = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [Document(id=f"d{i}", vector=vectors[i], text=f"item {i}", content_hash=f"h{i}") for i in range(n)]


def replica_and_refresh_settings(store: OpenSearchStore, index: str) -> dict[str, str]:
    found = store.client.indices.get_settings(index=index, flat_settings=True)[index]["settings"]
    return {name: found.get(f"index.{name}") for name in ("refresh_interval", "number_of_replicas",
                                                           "auto_expand_replicas")}


def is_green(store: OpenSearchStore, index: str) -> bool:
    return store.client.cluster.health(index=index, wait_for_status="green")["status"] == "green"  # waits up to 30 s


# An `index` run's large upsert that SIGKILLs itself once 200 documents are acknowledged: as by `kill -9` mid-bulk.
KILLED_LOAD = """
import os, signal, sys
from opensearchpy import helpers
import sidecar.stores.opensearch as opensearch
from tests.integration.test_opensearch_bulk import unit_documents

bulk = helpers.streaming_bulk

def killed_midway(*args, **kwargs):
    for acknowledged, result in enumerate(bulk(*args, **kwargs)):
        if acknowledged == 200:
            os.kill(os.getpid(), signal.SIGKILL)
        yield result

helpers.streaming_bulk = killed_midway
store = opensearch.OpenSearchStore(url=sys.argv[1], index=sys.argv[2], large_load_threshold=100, chunk_size=100)
store.upsert(unit_documents(400, int(sys.argv[3])))
"""


def test_setup_by_default_makes_an_index_green_on_any_node_count_and_loads_killed_or_not_leave_it_as_setup_made_it(
        node, alias):
    cli("opensearch", "setup", *opensearch_args(alias))  # default settings: no replica count given
    store = open_store(Settings.from_env(store="opensearch", opensearch_url=URL, opensearch_index=alias))
    store.large_load_threshold = 100
    try:
        (index,) = store.alias_indices()
        made = replica_and_refresh_settings(store, index)
        assert made["auto_expand_replicas"] == "0-1" and is_green(store, index)
        dim = store._mapping_dim()
        docs = unit_documents(400, dim)
        with store.bulk_load() as load:
            load.expect(len(docs))
            # Auto-expansion off for the load: OpenSearch would expand a bare `number_of_replicas: 0` back.
            assert replica_and_refresh_settings(store, index) == {
                "refresh_interval": "2s", "number_of_replicas": "0", "auto_expand_replicas": "false"}
            store.upsert(docs)
        assert replica_and_refresh_settings(store, index) == made and is_green(store, index)

        killed = subprocess.run([sys.executable, "-c", KILLED_LOAD, URL, alias, str(dim)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        assert replica_and_refresh_settings(store, index)["auto_expand_replicas"] == "false"
        assert any("interrupted load relaxed" in problem for problem in store.check().problems)
        assert any(action.startswith("restored") for action in store.repair().actions)
        assert replica_and_refresh_settings(store, index) == made and is_green(store, index)
        assert store.check().clean

        rebuilt = store.rebuild(iter(docs), signature=ModelSignature(model="synthetic", weights="w", dim=dim))
        assert replica_and_refresh_settings(store, rebuilt) == made and is_green(store, rebuilt)
    finally:
        drop(store)


def test_a_rebuild_stopped_by_ctrl_c_deletes_its_index_and_says_the_alias_is_unchanged(node, caplog, monkeypatch):
    monkeypatch.setattr("sidecar.stores.opensearch.REBUILD_BATCH", 100)
    store = make_store()
    docs, _, _ = make_documents(300)

    def interrupted() -> Iterator[Document]:
        yield from docs
        raise KeyboardInterrupt  # Ctrl-C once three batches are in the new index

    try:
        store.claim(SIGNATURE)
        store.upsert(docs[:100])
        (serving,) = store.alias_indices()
        with caplog.at_level(logging.WARNING, logger="sidecar.stores.opensearch"), pytest.raises(KeyboardInterrupt):
            store.rebuild(interrupted(), signature=SIGNATURE)
        assert any(f"rebuild of {store.alias} stopped (KeyboardInterrupt): deleted its unfinished index" in
                   r.getMessage() and r.getMessage().endswith(f"the alias still names {serving}") for r in caplog.records)
        assert store.client.indices.get(index=f"{store.alias}-v*").keys() == {serving}
        assert store.count() == 100
    finally:
        drop(store)
