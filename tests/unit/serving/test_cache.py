import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sidecar.errors import EncodeTimeout
from sidecar.serving.cache import TextVectorCache, cache_namespace


class CountingEncoder:
    def __init__(self, delay_s: float = 0.0):
        self.calls: list[list[str]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, texts):
        with self.lock:
            self.calls.append(list(texts))
        time.sleep(self.delay_s)
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


def namespace(version="1"):
    return cache_namespace(model="m", weights="w", prompt_template="a photo of {}", prompt_version=version)


def test_identical_concurrent_queries_are_computed_once():
    cache = TextVectorCache(None, namespace=namespace(), capacity=100)
    encode = CountingEncoder(delay_s=0.2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.get_or_compute(["red circle"], encode, timeout_s=10), range(8)))
    assert encode.calls == [["red circle"]]
    for rows in results:
        np.testing.assert_array_equal(rows, [[10, 1.0]])


def test_results_keep_request_order_with_mixed_hits_and_misses():
    cache = TextVectorCache(None, namespace=namespace(), capacity=100)
    encode = CountingEncoder()
    cache.get_or_compute(["bb"], encode, timeout_s=10)
    rows = cache.get_or_compute(["a", "bb", "ccc", "a"], encode, timeout_s=10)
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


def test_persisted_vectors_survive_a_restart_and_a_new_prompt_version_re_embeds(tmp_path):
    path = tmp_path / "text-vectors.sqlite"
    encode = CountingEncoder()
    first = TextVectorCache(path, namespace=namespace("1"), capacity=10)
    first.get_or_compute(["red circle", "blue"], encode, timeout_s=10)
    reopened = TextVectorCache(path, namespace=namespace("1"), capacity=10)
    reopened.get_or_compute(["red circle", "blue"], encode, timeout_s=10)
    assert encode.calls == [["red circle", "blue"]]
    assert reopened.persisted_count() == 2
    TextVectorCache(path, namespace=namespace("2"), capacity=10).get_or_compute(["red circle"], encode, timeout_s=10)
    assert encode.calls[-1] == ["red circle"]


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
        return np.ones((len(texts), 2), dtype=np.float32)

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
        np.testing.assert_array_equal(owner.result(), [[1.0, 1.0]])


def test_the_persistent_cache_keeps_at_most_max_entries_dropping_the_least_recently_used(tmp_path):
    path = tmp_path / "text-vectors.sqlite"
    encode = CountingEncoder()
    cache = TextVectorCache(path, namespace=namespace(), capacity=1, max_entries=10)
    for i in range(10):
        cache.get_or_compute([f"t{i}"], encode, timeout_s=10)
    cache.get_or_compute(["t0"], encode, timeout_s=10)  # read back from disk: now the most recent
    cache.get_or_compute(["t10"], encode, timeout_s=10)  # 11 > 10: down to 9, the two least recent go
    cache.close()
    assert len(encode.calls) == 11

    reopened = TextVectorCache(path, namespace=namespace(), capacity=100, max_entries=10)
    assert reopened.persisted_count() == 9
    reopened.get_or_compute(["t0", "t3", "t9", "t10"], encode, timeout_s=10)
    assert len(encode.calls) == 11, "kept entries come from disk"
    reopened.get_or_compute(["t1", "t2"], encode, timeout_s=10)
    assert encode.calls[-1] == ["t1", "t2"], "the least recently used were evicted"
