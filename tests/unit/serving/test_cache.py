import logging
import multiprocessing
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import REGISTRY

from sidecar.errors import EncodeTimeout
from sidecar.serving.cache import CachedText, TextVectorCache, cache_namespace
from tests.support import damage_sqlite_file


class CountingEncoder:
    def __init__(self, delay_s: float = 0.0):
        self.calls: list[list[str]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, texts):
        with self.lock:
            self.calls.append(list(texts))
        time.sleep(self.delay_s)
        return [CachedText(np.array([len(t), 1.0], dtype=np.float32), len(t) + 2) for t in texts]


def vectors(entries) -> np.ndarray:
    return np.stack([entry.vector for entry in entries])


def encode_through_disk(cache: TextVectorCache, encode: CountingEncoder):
    """What EncodingService hands get_or_compute: the batcher running `encode` behind the table."""
    return cache.through_disk(encode)


def namespace(version="1"):
    return cache_namespace(model="m", weights="w", prompt_template="a photo of {}", prompt_version=version)


def test_identical_concurrent_queries_are_computed_once():
    cache = TextVectorCache(None, namespace=namespace(), capacity=100)
    encode = CountingEncoder(delay_s=0.2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.get_or_compute(["red circle"], encode, timeout_s=10), range(8)))
    assert encode.calls == [["red circle"]]
    for entries in results:
        np.testing.assert_array_equal(vectors(entries), [[10, 1.0]])
        assert entries[0].tokens == 12


def test_results_keep_request_order_with_mixed_hits_and_misses():
    cache = TextVectorCache(None, namespace=namespace(), capacity=100)
    encode = CountingEncoder()
    cache.get_or_compute(["bb"], encode, timeout_s=10)
    rows = vectors(cache.get_or_compute(["a", "bb", "ccc", "a"], encode, timeout_s=10))
    np.testing.assert_array_equal(rows[:, 0], [1, 2, 3, 1])
    assert encode.calls == [["bb"], ["a", "ccc"]]


def test_lru_evicts_the_coldest_entry():
    cache = TextVectorCache(None, namespace=namespace(), capacity=2)
    encode = CountingEncoder()
    for text in ("a", "b", "a", "c"):
        cache.get_or_compute([text], encode, timeout_s=10)
    cache.get_or_compute(["a"], encode, timeout_s=10)
    cache.get_or_compute(["b"], encode, timeout_s=10)
    assert encode.calls == [["a"], ["b"], ["c"], ["b"]]


def test_a_vector_kept_in_memory_holds_its_own_row_not_its_batchs_array():
    """A forward answers its batch as one array; the entries it made were views of it, so the one text of a
    batch of 64 still in memory kept all 64 vectors alive, and text_cache_size bounded nothing."""
    def encode_as_one_array(texts):
        batch = np.arange(len(texts) * 512, dtype=np.float32).reshape(len(texts), 512)
        return [CachedText(row, 3) for row in batch]

    cache = TextVectorCache(None, namespace=namespace(), capacity=1)
    entries = cache.get_or_compute([f"text {i}" for i in range(64)], encode_as_one_array, timeout_s=10)
    kept = cache.get_or_compute(["text 63"], encode_as_one_array, timeout_s=10)[0]
    assert cache._lru["text 63"] is kept
    held = kept.vector
    while isinstance(held, np.ndarray) and held.base is not None:
        held = held.base
    assert held.nbytes == 512 * 4
    np.testing.assert_array_equal(vectors(entries)[:, 0], np.arange(64) * 512)


def test_persisted_vectors_survive_a_restart_and_a_new_prompt_version_re_embeds(tmp_path):
    path = tmp_path / "text-vectors.sqlite"
    encode = CountingEncoder()
    first = TextVectorCache(path, namespace=namespace("1"), capacity=10)
    first.get_or_compute(["red circle", "blue"], encode_through_disk(first, encode), timeout_s=10)
    first.close()  # commits what its writer thread holds
    reopened = TextVectorCache(path, namespace=namespace("1"), capacity=10)
    entries = reopened.get_or_compute(["red circle", "blue"], encode_through_disk(reopened, encode), timeout_s=10)
    assert encode.calls == [["red circle", "blue"]]
    assert [entry.tokens for entry in entries] == [12, 6]  # token counts are kept with the vectors
    assert reopened.persisted_count() == 2
    other = TextVectorCache(path, namespace=namespace("2"), capacity=10)
    other.get_or_compute(["red circle"], encode_through_disk(other, encode), timeout_s=10)
    assert encode.calls[-1] == ["red circle"]


def test_lookups_count_a_text_found_in_the_file_as_a_disk_hit_not_a_miss(tmp_path):
    # A restarted worker (or one after `cache warm`) answers from the file without encoding: the metric must
    # say so, or a warm cache reads as a cold one.
    def count(result: str) -> float:
        return REGISTRY.get_sample_value("sidecar_text_cache_lookups_total", {"result": result, "model": "coarse"}) or 0

    path = tmp_path / "text-vectors.sqlite"
    encode = CountingEncoder()
    first = TextVectorCache(path, namespace=namespace(), capacity=10)
    before = {result: count(result) for result in ("hit", "disk_hit", "miss")}
    first.get_or_compute(["red circle", "blue"], encode_through_disk(first, encode), timeout_s=10)
    first.get_or_compute(["blue"], encode_through_disk(first, encode), timeout_s=10)
    first.close()
    reopened = TextVectorCache(path, namespace=namespace(), capacity=10)
    reopened.get_or_compute(["red circle", "green"], encode_through_disk(reopened, encode), timeout_s=10)
    reopened.close()
    added = {result: count(result) - before[result] for result in before}
    assert added == {"hit": 1, "disk_hit": 1, "miss": 3}  # blue from memory; red circle from the file; 3 encoded


def test_the_table_is_read_once_per_batch_and_written_off_the_callers_thread(tmp_path):
    path = tmp_path / "text-vectors.sqlite"
    encode = CountingEncoder()
    cache = TextVectorCache(path, namespace=namespace(), capacity=10)
    batch = cache.through_disk(encode)
    batch(["a", "b"])
    cache.flush()
    assert [entry.tokens for entry in batch(["a", "c", "b"])] == [3, 3, 3]
    assert encode.calls == [["a", "b"], ["c"]]
    cache.close()
    assert TextVectorCache(path, namespace=namespace(), capacity=10).persisted_count() == 3


def test_a_failed_computation_reaches_every_waiter_and_is_not_cached():
    cache = TextVectorCache(None, namespace=namespace(), capacity=10)

    def broken(texts):
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="model exploded"):
        cache.get_or_compute(["x"], broken, timeout_s=10)
    encode = CountingEncoder()
    cache.get_or_compute(["x"], encode, timeout_s=10)
    assert encode.calls == [["x"]]


def test_a_waiter_on_another_requests_encode_gives_up_at_its_deadline():
    cache = TextVectorCache(None, namespace=namespace(), capacity=10)
    release = threading.Event()

    def stuck(texts):
        release.wait(30)
        return [CachedText(np.ones(2, dtype=np.float32), 3) for _ in texts]

    with ThreadPoolExecutor(2) as pool:
        try:
            owner = pool.submit(cache.get_or_compute, ["x"], stuck, timeout_s=60)
            time.sleep(0.05)  # the owner's encode of "x" is in flight
            waiter = pool.submit(cache.get_or_compute, ["x"], CountingEncoder(), timeout_s=0.1)
            with pytest.raises(EncodeTimeout, match="request_timeout_s=0.1") as info:
                waiter.result(timeout=10)  # never blocks past its own deadline
            assert info.value.status == 504
        finally:
            release.set()
        np.testing.assert_array_equal(vectors(owner.result()), [[1.0, 1.0]])


def test_the_persistent_cache_keeps_at_most_max_entries_dropping_the_least_recently_used(tmp_path):
    path = tmp_path / "text-vectors.sqlite"
    encode = CountingEncoder()
    cache = TextVectorCache(path, namespace=namespace(), capacity=1, max_entries=10)
    for i in range(10):
        cache.get_or_compute([f"t{i}"], encode_through_disk(cache, encode), timeout_s=10)
        cache.flush()  # each its own last-use time
    cache.get_or_compute(["t0"], encode_through_disk(cache, encode), timeout_s=10)  # from disk: now the most recent
    cache.flush()
    cache.get_or_compute(["t10"], encode_through_disk(cache, encode), timeout_s=10)  # 11 > 10: down to 9
    cache.close()
    assert len(encode.calls) == 11

    reopened = TextVectorCache(path, namespace=namespace(), capacity=100, max_entries=10)
    assert reopened.persisted_count() == 9
    reopened.get_or_compute(["t0", "t3", "t9", "t10"], encode_through_disk(reopened, encode), timeout_s=10)
    assert len(encode.calls) == 11, "kept entries come from disk"
    reopened.get_or_compute(["t1", "t2"], encode_through_disk(reopened, encode), timeout_s=10)
    assert encode.calls[-1] == ["t1", "t2"], "the least recently used were evicted"


def test_workers_sharing_the_file_keep_it_within_max_entries_together(tmp_path):
    # Each worker counted the file once, at its start, then only its own inserts: four workers filling a
    # new file took it to 4,000 rows under a bound of 1,000 before any of them evicted.
    path = tmp_path / "text-vectors.sqlite"
    workers = [TextVectorCache(path, namespace=namespace(), capacity=1, max_entries=1000) for _ in range(4)]
    try:
        largest = 0
        for round_ in range(10):
            for i, worker in enumerate(workers):
                worker.through_disk(CountingEncoder())([f"w{i} r{round_} t{j}" for j in range(100)])
                worker.flush()
                with sqlite3.connect(path) as db:
                    largest = max(largest, db.execute("SELECT count(*) FROM text_vectors").fetchone()[0])
                db.close()
    finally:
        for worker in workers:
            worker.close()
    assert largest <= 1000


def test_writes_that_keep_failing_are_warned_about_once_not_per_batch(tmp_path, caplog):
    # A file the server can no longer write failed every batch of the writer thread, and each said so: under load
    # a warning every 50 ms in each worker. Here another process holds the write lock past the busy timeout.
    path = tmp_path / "text-vectors.sqlite"
    cache = TextVectorCache(path, namespace=namespace(), capacity=1)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        cache.through_disk(CountingEncoder())(["before"])
        cache.flush()
        cache._write_db.execute("PRAGMA busy_timeout = 10")  # the writer's 30 s wait, shortened for the test
        holder.execute("BEGIN IMMEDIATE")
        caplog.set_level(logging.WARNING, logger="sidecar.serving.cache")
        for i in range(3):
            cache.through_disk(CountingEncoder())([f"batch {i}"])
            cache.flush()
    finally:
        holder.close()
        cache.close()
    failed = [r.getMessage() for r in caplog.records]
    assert len(failed) == 1 and failed[0].startswith("text-vector cache: 1 vectors (or their last-use times) could "
                                                     "not be written: database is locked"), failed


def test_a_file_damaged_under_two_running_workers_is_moved_aside_once_and_both_go_on_in_a_new_one(tmp_path, caplog):
    # Damaged under a running server (a disk fault), the file was read as misses and every write failed until
    # the workers restarted. Now the first worker to find it unreadable moves it aside; the other connects to
    # the new file at the path, which it must not move aside in turn.
    path = tmp_path / "text-vectors.sqlite"
    first, second = (TextVectorCache(path, namespace=namespace(), capacity=1) for _ in range(2))
    try:
        first.through_disk(CountingEncoder())(["before"])
        first.flush()
        damage_sqlite_file(path)
        caplog.set_level(logging.WARNING, logger="sidecar.serving.cache")
        for cache, text in ((first, "one"), (second, "two"), (first, "three"), (second, "one")):
            encoder = CountingEncoder()
            cache.through_disk(encoder)([text])
            cache.flush()
        assert encoder.calls == []  # "one", written by the first worker into the new file, read by the second
        assert first.persisted_count() == second.persisted_count() == 3
    finally:
        first.close()
        second.close()
    assert path.with_name(path.name + ".unreadable").read_bytes().startswith(b"not a database")
    moved = [r.getMessage() for r in caplog.records]
    assert len(moved) == 1 and "moved to text-vectors.sqlite.unreadable and began a new one" in moved[0], moved


def test_the_write_ahead_log_is_cut_back_after_a_large_write(tmp_path):
    # One transaction of 6,000 512-d vectors grows SQLite's write-ahead log to ~25 MB; SQLite would
    # leave the file at that size for good. With the limit it is cut back when the log next starts over.
    path = tmp_path / "text.sqlite"
    wal = path.with_name(path.name + "-wal")
    cache = TextVectorCache(path, namespace=namespace(), capacity=10, max_entries=100_000)

    def encode(texts):
        return [CachedText(np.ones(512, dtype=np.float32), 3) for _ in texts]

    cache.get_or_compute([f"t{i}" for i in range(6000)], cache.through_disk(encode), timeout_s=30)
    cache.flush()
    grown = wal.stat().st_size
    cache.get_or_compute(["one more"], cache.through_disk(encode), timeout_s=30)
    cache.flush()
    cut = wal.stat().st_size
    cache.close()
    assert grown > 16 << 20, "the large write did not grow the log: the test proves nothing"
    assert cut <= 8 << 20
    reopened = TextVectorCache(path, namespace=namespace(), capacity=10)
    assert reopened.persisted_count() == 6001  # cutting the file back lost nothing
    reopened.close()


def _open_together(path, barrier) -> None:
    barrier.wait(timeout=120)  # every process imported and ready: they open the file at one moment
    TextVectorCache(path, namespace=namespace(), capacity=10)


def test_processes_opening_a_new_cache_file_at_once_all_start(tmp_path):
    # gunicorn boots its workers together, each opening the same new file; a worker that fails here
    # fails to boot and takes the server down with it. The processes come from a fork server, as
    # gunicorn's come from its one-threaded arbiter: forked from this many-threaded test process, a
    # child can inherit a lock another thread held at the fork (SQLite's among them) and hang.
    context = multiprocessing.get_context("forkserver")
    for attempt in range(5):
        path = tmp_path / f"attempt{attempt}" / "text.sqlite"
        barrier = context.Barrier(8)
        workers = [context.Process(target=_open_together, args=(path, barrier)) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(180)
        assert [worker.exitcode for worker in workers] == [0] * 8, f"attempt {attempt}"


def test_a_cache_file_that_cannot_be_opened_for_another_reason_than_its_contents_is_not_moved_aside(tmp_path):
    # Only contents SQLite cannot read are replaced; a folder the process may not write is the operator's.
    path = tmp_path / "text-vectors.sqlite"
    TextVectorCache(path, namespace=namespace(), capacity=10).close()
    path.unlink()
    path.mkdir()  # SQLite's "unable to open database file": not a damaged file. Said naming the file and why.
    with pytest.raises(IsADirectoryError) as caught:
        TextVectorCache(path, namespace=namespace(), capacity=10)
    assert caught.value.filename == str(path)
    assert path.is_dir() and not path.with_name(path.name + ".unreadable").exists()
