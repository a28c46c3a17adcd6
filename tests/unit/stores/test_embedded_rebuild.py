"""The embedded store's full rebuild: a new version built beside the one serving, switched to by one rename of
the `current` pointer; readers (other store objects: other processes' workers) answer from the old contents
until then and from the new ones after, a killed rebuild leaves the old version serving, and a replaced version
is removed once nobody reads it."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sidecar.ingest.indexing import rebuild_index
from sidecar.ingest.shards import ShardError
from sidecar.stores.base import QueryModelMismatch, StoreError, StoreLocked
from sidecar.stores.embedded import EmbeddedStore
from sidecar.stores.embedded import store as embedded_store
from sidecar.stores.embedded.version import VersionStore
from sidecar.types import ModelSignature
from tests.support import removed_soon, write_shards
from tests.unit.stores.test_embedded import SIGNATURE, make_docs

REPO_ROOT = Path(__file__).resolve().parents[3]


def ids_of(hits) -> list[str]:
    return [hit.id for hit in hits]


@pytest.fixture
def served(tmp_path: Path):
    """A store of 30 documents (version 0) and a reader of it: another process's server, say."""
    path = tmp_path / "store"
    with EmbeddedStore(path) as writer:
        writer.claim(SIGNATURE)
        writer.upsert(make_docs(30))
    with EmbeddedStore(path) as reader:
        yield path, reader


def test_a_reader_answers_from_the_old_version_while_a_rebuild_builds_and_from_the_new_one_after(served, monkeypatch):
    path, reader = served
    monkeypatch.setattr(embedded_store, "_REBUILD_BATCH", 5)  # several commits into the new version before the switch
    new_docs = make_docs(20, seed=1, prefix="new", version=1)
    seen_while_building = []

    def documents():
        for i, doc in enumerate(new_docs):
            if i == 15:  # three batches of the new version are committed by now
                assert (path / "version.1" / "store.sqlite").exists()
                seen_while_building.append((reader.count(), ids_of(reader.vector_search(make_docs(30)[3].vector, 1)),
                                            ids_of(reader.text_search("number3", 1))))
            yield doc

    with EmbeddedStore(path) as rebuilder:
        name = rebuilder.rebuild(documents(), signature=SIGNATURE)
    assert seen_while_building == [(30, ["doc3"], ["doc3"])]
    assert Path(name) == path / "version.1" and os.readlink(path / "current") == "version.1"
    assert reader.count() == 20  # the same store object, no reopening
    assert ids_of(reader.vector_search(new_docs[7].vector, 1)) == ["new7"]
    assert ids_of(reader.text_search("number7", 1)) == ["new7"] and reader.text_search("doc3", 1) == []
    assert reader.check().clean


def test_a_current_pointer_naming_a_version_not_on_disk_is_refused_naming_it_and_the_versions_there(tmp_path: Path):
    # It was "the version current names was replaced 5 times while this process opened it; try again", from every
    # command and every retry: no rebuild had raced, and trying again never helped.
    path = tmp_path / "store"
    with EmbeddedStore(path) as store:
        store.claim(SIGNATURE)
        store.rebuild(make_docs(5), signature=SIGNATURE)
    os.replace(path / "current", path / "kept")
    os.symlink("version.9", path / "current")
    with pytest.raises(StoreError) as refused:
        EmbeddedStore(path)
    assert str(refused.value).startswith(f"{path / 'current'} names version.9, which is not on disk (removed by "
                                         "hand, or left out of a copy of the store; versions on disk: version.1): "
                                         "point it at one of them")
    os.replace(path / "kept", path / "current")
    with EmbeddedStore(path) as store:
        assert store.count() == 5


def test_a_replaced_version_stays_on_disk_while_a_reader_holds_it_and_goes_when_it_lets_go(served):
    path, reader = served
    assert reader.count() == 30  # the reader has version 0 open
    with EmbeddedStore(path) as rebuilder:
        rebuilder.rebuild(make_docs(20, seed=1, prefix="new", version=1), signature=SIGNATURE)
    assert (path / "store.sqlite").exists() and (path / "vectors.f32").exists()
    with EmbeddedStore(path) as checker:
        assert any("version 0" in note and "replaced by a rebuild" in note for note in checker.check().notes)
    assert reader.count() == 20  # its first call after the switch moves it, and it lets go of version 0
    assert removed_soon(path / "store.sqlite") and not (path / "bm25").exists()
    assert sorted(entry.name for entry in path.iterdir()) == ["current", "load.lock", "version.1"]
    with EmbeddedStore(path) as rebuilder:  # a second rebuild replaces version 1 the same way
        rebuilder.rebuild(make_docs(10, seed=2, prefix="third", version=2), signature=SIGNATURE)
    assert reader.count() == 10 and removed_soon(path / "version.1")
    assert EmbeddedStore.exists_at(path)



def test_the_log_names_a_removed_version_0_as_the_stores_own_files_not_as_the_store(tmp_path, caplog):
    # A store's first rebuild logged "removed data/store, a version of data/store that a rebuild replaced":
    # read as the whole store gone, where only the files of the version it replaced were.
    path = tmp_path / "store"
    with EmbeddedStore(path) as writer:
        writer.claim(SIGNATURE)
        writer.upsert(make_docs(30))
    with caplog.at_level(logging.INFO, logger="sidecar.stores.embedded"):
        for number in (1, 2):  # closing the store waits for its removal of the version it replaced
            with EmbeddedStore(path) as rebuilder:
                rebuilder.rebuild(make_docs(10, seed=number, prefix=f"v{number}-", version=number), signature=SIGNATURE)
    assert [record.getMessage() for record in caplog.records if record.getMessage().startswith("removed ")] == [
        f"removed version 0 (the store's own files) of {path}, which a rebuild replaced",
        f"removed version.1 of {path}, which a rebuild replaced"]


def test_the_call_that_lets_go_of_a_replaced_version_returns_before_its_removal_and_close_waits_for_the_removal(
        served, monkeypatch):
    # A server's request makes the call that lets go of a replaced version: unlinking a version of realistic size
    # (100k documents) is not that request's work.
    path, reader = served
    assert reader.count() == 30  # the reader holds version 0
    with EmbeddedStore(path) as rebuilder:
        rebuilder.rebuild(make_docs(20, seed=1, prefix="new", version=1), signature=SIGNATURE)
    removing, go_on = threading.Event(), threading.Event()
    remove = reader._remove

    def held_up_remove(number: int) -> bool:
        removing.set()
        go_on.wait(timeout=60)
        return remove(number)

    monkeypatch.setattr(reader, "_remove", held_up_remove)
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(reader.count)  # moves the reader to version 1 and lets go of version 0
            assert call.result(timeout=30) == 20 and removing.wait(timeout=30)
            assert (path / "store.sqlite").exists()  # the removal waits; the call has returned
    finally:
        go_on.set()
    reader.close()
    assert not (path / "store.sqlite").exists()


def test_a_version_let_go_while_the_store_closes_is_removed_before_close_returns(served, monkeypatch):
    # A call lets go of the replaced version 0 while another thread closes the store; the removal thread is held
    # as it is made, so close runs while the call is between taking version 0 off the list and starting it.
    path, reader = served
    assert reader.count() == 30  # the reader holds version 0
    with EmbeddedStore(path) as rebuilder:
        rebuilder.rebuild(make_docs(20, seed=1, prefix="new", version=1), signature=SIGNATURE)
    letting_go, go_on = threading.Event(), threading.Event()

    class HeldUpThread(embedded_store.NamedThread):
        def __init__(self, *args, **kwargs):
            letting_go.set()
            go_on.wait(timeout=10)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(embedded_store, "NamedThread", HeldUpThread)
    order = []
    with ThreadPoolExecutor(2) as pool:
        pool.submit(reader.count)  # moves the reader to version 1 and lets go of version 0 (may then find it closed)
        assert letting_go.wait(timeout=30)
        closing = pool.submit(lambda: (reader.close(), order.append("closed")))
        time.sleep(1)  # long enough for a close that does not wait to return
        order.append("removal thread made")
        go_on.set()
        closing.result(timeout=30)
    assert order == ["removal thread made", "closed"]
    assert not (path / "store.sqlite").exists() and not (path / "bm25").exists()


def test_a_replaced_version_a_call_still_uses_when_the_store_closes_is_removed_when_that_call_ends(served):
    path, reader = served
    holding, leave = threading.Event(), threading.Event()

    def hold_version_0():
        with reader.one_version():
            reader.count()
            holding.set()
            leave.wait(timeout=30)

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(hold_version_0)
        assert holding.wait(timeout=30)
        with EmbeddedStore(path) as rebuilder:
            rebuilder.rebuild(make_docs(20, seed=1, prefix="new", version=1), signature=SIGNATURE)
        assert reader.count() == 20  # this thread moves to version 1; the other still uses version 0
        reader.close()
        leave.set()
        held.result(timeout=30)
    assert not (path / "store.sqlite").exists() and not (path / "bm25").exists()
    assert sorted(entry.name for entry in path.iterdir()) == ["current", "load.lock", "version.1"]


def test_a_call_running_when_the_store_closes_finishes_on_its_version_and_later_calls_are_refused(
        served, monkeypatch):
    # close() closed the SQLite connections of a version a call was still reading: the call's next statement
    # failed "Cannot operate on a closed database", or, landing inside a running statement, killed the process.
    _, reader = served
    inside, go_on = threading.Event(), threading.Event()
    scored = VersionStore._scored

    def held_up_scored(self, conn, hits):  # the call is inside its read transaction, between two statements
        inside.set()
        go_on.wait(timeout=30)
        return scored(self, conn, hits)

    monkeypatch.setattr(VersionStore, "_scored", held_up_scored)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(reader.text_search, "number3", 1)
        assert inside.wait(timeout=30)
        reader.close()
        with pytest.raises(StoreError, match="is closed"):
            reader.count()
        go_on.set()
        assert ids_of(call.result(timeout=30)) == ["doc3"]


def test_closing_the_store_while_threads_search_it_refuses_their_later_calls_and_never_crashes_the_process(
        served):
    # Run in a process of its own: before the fix, closing under running statements crashed it (SIGSEGV)
    # within a few of these rounds.
    path, _ = served
    script = textwrap.dedent(f"""
        import threading
        from sidecar.stores.base import StoreError
        from sidecar.stores.embedded import EmbeddedStore

        unexpected = []
        for n in range(40):
            store = EmbeddedStore({str(path)!r})
            started = threading.Barrier(4)

            def search(store=store, started=started):
                started.wait()
                try:
                    while True:
                        store.count()
                        store.text_search("number3 number7", 5)
                        store.fetch(["doc1", "doc2"], vectors=False)
                except StoreError:  # closed: refused
                    pass
                except Exception as exc:
                    unexpected.append(repr(exc))

            threads = [threading.Thread(target=search) for _ in range(3)]
            for thread in threads:
                thread.start()
            started.wait()
            for _ in range(n % 5):  # close at a different point of the searches each round
                store.count()
            store.close()
            for thread in threads:
                thread.join()
        assert not unexpected, unexpected
    """)
    ran = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], cwd=REPO_ROOT, timeout=300,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert ran.returncode == 0, ran.stderr[-3000:]


def test_an_index_run_waits_for_a_rebuild_or_is_refused_naming_it_and_a_rebuild_refuses_beside_an_index_run(served):
    path, reader = served
    refusals = []

    def documents():
        try:
            reader.upsert(make_docs(1, prefix="late"))
        except StoreLocked as exc:
            refusals.append(str(exc))
        yield from make_docs(5, seed=1, prefix="new")

    with EmbeddedStore(path) as rebuilder:
        rebuilder.rebuild(documents(), signature=SIGNATURE)
        assert len(refusals) == 1 and f"{path} is being loaded by a rebuild by " in refusals[0]
        assert "--wait-for-lock SECONDS" in refusals[0]
        with reader.bulk_load():
            with pytest.raises(StoreLocked, match="is being loaded by an index run; rebuild would write beside it"):
                rebuilder.rebuild(make_docs(3), signature=SIGNATURE)
    assert reader.content_hashes().keys() == {f"new{i}" for i in range(5)}


def kill_a_rebuild_midway(path: Path) -> int:
    """Run a rebuild of the store at `path` in a process of its own and SIGKILL it mid-build; returns its pid."""
    marker = path.parent / "building"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from sidecar.stores.embedded import store as embedded_store
        from tests.unit.stores.test_embedded import SIGNATURE, make_docs

        embedded_store._REBUILD_BATCH = 5

        def documents():
            for i, doc in enumerate(make_docs(20, seed=1, prefix="new", version=1)):
                if i == 15:
                    Path({str(marker)!r}).touch()
                    time.sleep(600)
                yield doc

        embedded_store.EmbeddedStore({str(path)!r}).rebuild(documents(), signature=SIGNATURE)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert (path / "version.1" / "store.sqlite").exists()  # the kill lands mid-build
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    return process.pid


def test_a_rebuild_killed_midway_leaves_the_old_version_serving_and_a_rerun_completes(served):
    path, reader = served
    kill_a_rebuild_midway(path)
    assert not (path / "current").exists()
    with EmbeddedStore(path) as after:
        assert after.count() == 30 and ids_of(after.vector_search(make_docs(30)[3].vector, 1)) == ["doc3"]
        report = after.check()
        assert report.clean and any("version.1 is a rebuild's unfinished version" in n for n in report.notes)
        after.rebuild(make_docs(20, seed=1, prefix="new", version=1), signature=SIGNATURE)
        assert after.count() == 20  # the partial version was removed first, the new one built in full
        assert not any("unfinished" in note for note in after.check().notes)
    assert reader.count() == 20 and reader.check().clean


def test_a_rebuild_refused_beside_an_index_run_after_a_killed_rebuild_names_the_index_run_not_the_dead_rebuild(
        served):
    path, reader = served
    dead = kill_a_rebuild_midway(path)
    assert f"a rebuild by {socket.gethostname()} pid {dead}" in (path / "load.lock").read_text()  # its name stays
    with EmbeddedStore(path) as rebuilder, reader.bulk_load():
        with pytest.raises(StoreLocked) as refused:
            rebuilder.rebuild(make_docs(3), signature=SIGNATURE)
    assert "is being loaded by an index run; rebuild would write beside it" in str(refused.value)
    assert f"pid {dead}" not in str(refused.value)

def test_a_rebuild_with_another_model_switches_the_recorded_model_and_a_reader_checked_on_the_old_one_is_refused(
        served):
    path, reader = served
    assert reader.signature() == SIGNATURE  # what a server checks its queries' model against
    other = ModelSignature(model="other-clip", weights="other", dim=SIGNATURE.dim)
    with EmbeddedStore(path) as rebuilder:
        rebuilder.rebuild(make_docs(20, seed=1, prefix="new"), signature=other)
    query = make_docs(20, seed=1, prefix="new")[4].vector
    with pytest.raises(QueryModelMismatch, match="vectors of other-clip"):
        reader.vector_search(query, 1)  # ranked by the old model's vectors: refused, once
    assert reader.signature() == other
    assert ids_of(reader.vector_search(query, 1)) == ["new4"]


def test_a_request_thread_checked_on_the_old_model_is_refused_even_after_another_thread_checked_the_new_one(served):
    path, reader = served
    first, second = ThreadPoolExecutor(1), ThreadPoolExecutor(1)  # two request threads of one server worker
    try:
        assert first.submit(reader.signature).result() == SIGNATURE  # its query is encoded by the old model
        other = ModelSignature(model="other-clip", weights="other", dim=SIGNATURE.dim)
        with EmbeddedStore(path) as rebuilder:
            rebuilder.rebuild(make_docs(20, seed=1, prefix="new"), signature=other)
        assert second.submit(reader.signature).result() == other  # a later request checks the new record
        with pytest.raises(QueryModelMismatch, match="vectors of other-clip"):
            first.submit(reader.vector_search, make_docs(30)[3].vector, 1).result()
    finally:
        first.shutdown()
        second.shutdown()


def test_calls_in_one_version_block_answer_from_its_first_calls_version_through_a_switch_which_stays_until_it_ends(
        served):
    path, reader = served
    query = make_docs(30)[3].vector
    with reader.one_version():  # one request of a server: search, then fetch what it found
        found = ids_of(reader.vector_search(query, 5))
        with EmbeddedStore(path) as rebuilder:
            rebuilder.rebuild(make_docs(20, seed=1, prefix="new", version=1), signature=SIGNATURE)
        assert [doc.id for doc in reader.fetch(found)] == found and found[0] == "doc3"
        assert reader.count() == 30 and ids_of(reader.text_search("number3", 1)) == ["doc3"]
        assert (path / "store.sqlite").exists()
    assert reader.count() == 20 and ids_of(reader.vector_search(make_docs(20, seed=1, prefix="new")[3].vector, 1)) \
        == ["new3"]
    assert removed_soon(path / "store.sqlite")  # the block let go of version 0: removed


def test_a_removal_of_version_0_killed_midway_is_finished_by_the_next_rebuild_leaving_none_of_its_files(served):
    path, reader = served
    assert reader.count() == 30  # holds version 0: the rebuild below leaves its removal to the reader's process
    with EmbeddedStore(path) as rebuilder:
        rebuilder.rebuild(make_docs(20, seed=1, prefix="new", version=1), signature=SIGNATURE)
    with (path / "read.lock").open() as other_reader:  # another process still has version 0 open when this one
        fcntl.flock(other_reader, fcntl.LOCK_SH)  # closes: its removal falls to the repair below
        reader.close()
    script = textwrap.dedent(f"""
        import os, pathlib, signal
        from sidecar.stores.embedded import EmbeddedStore

        unlink = pathlib.Path.unlink

        def killed_at_the_vectors(self, missing_ok=False):  # SIGKILL lands in the middle of the removal
            if self.name == "vectors.f32":
                os.kill(os.getpid(), signal.SIGKILL)
            unlink(self, missing_ok=missing_ok)

        pathlib.Path.unlink = killed_at_the_vectors
        EmbeddedStore({str(path)!r}).repair()
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert killed.returncode == -signal.SIGKILL and (path / "vectors.f32").exists()
    with EmbeddedStore(path) as rebuilder:
        rebuilder.rebuild(make_docs(10, seed=2, prefix="third", version=2), signature=SIGNATURE)
        assert rebuilder.count() == 10
    assert sorted(entry.name for entry in path.iterdir()) == ["current", "load.lock", "version.2"]


def test_a_rebuild_waiting_for_an_index_run_refuses_the_documents_that_run_writes_from_another_shard_directory(
        served, tmp_path, monkeypatch):
    # The unsharded check reads what is stored once the rebuild holds the load lock: read while it waited, it missed
    # what the index run it waited for wrote, and the rebuild dropped those documents unnamed.
    path, reader = served
    shards = write_shards(tmp_path / "shards", make_docs(30), SIGNATURE)
    waiting, outcome = threading.Event(), []
    with EmbeddedStore(path) as rebuilder:
        take_load_lock = rebuilder._take_load_lock

        def signalling_take_load_lock(*args, **kwargs):
            waiting.set()
            return take_load_lock(*args, **kwargs)

        monkeypatch.setattr(rebuilder, "_take_load_lock", signalling_take_load_lock)

        def rebuild() -> None:
            try:
                outcome.append(rebuild_index(rebuilder, shards, lock_wait_s=60, progress=False))
            except ShardError as exc:
                outcome.append(exc)

        with reader.bulk_load():  # an index run from another shard directory, holding the load lock
            thread = threading.Thread(target=rebuild)
            thread.start()
            assert waiting.wait(timeout=60)
            reader.upsert(make_docs(2, prefix="other"))
        thread.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], ShardError), outcome
    assert "2 stored documents are in no shard of" in str(outcome[0]) and "'other0'" in str(outcome[0])
    assert reader.count() == 32 and not (path / "current").exists()


def test_the_rebuild_progress_bar_advances_per_batch_committed_not_per_shard_batch_pulled(
        served, tmp_path, monkeypatch, indexing_progress):
    path, _ = served
    monkeypatch.setattr(embedded_store, "_REBUILD_BATCH", 5)  # the store commits 5 at a time
    shards = write_shards(tmp_path / "shards", make_docs(20, seed=1, prefix="new", version=1), SIGNATURE)
    with EmbeddedStore(path) as rebuilder:
        summary = rebuild_index(rebuilder, shards, batch_size=10_000, drop_unsharded=True, progress=True)
    assert summary.written == 20
    # The 20 are one shard batch: the bar counted it pulled (0 then 1 batch), not the documents as committed.
    assert indexing_progress == [5, 10, 15, 20]
