import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

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
        results = list(pool.map(lambda _: cache.get_or_compute(["red circle"], encode), range(8)))
    assert encode.calls == [["red circle"]]
    for rows in results:
        np.testing.assert_array_equal(rows, [[10, 1.0]])


def test_results_keep_request_order_with_mixed_hits_and_misses():
    cache = TextVectorCache(None, namespace=namespace(), capacity=100)
    encode = CountingEncoder()
    cache.get_or_compute(["bb"], encode)
    rows = cache.get_or_compute(["a", "bb", "ccc", "a"], encode)
    np.testing.assert_array_equal(rows[:, 0], [1, 2, 3, 1])
    assert encode.calls == [["bb"], ["a", "ccc"]]


def test_lru_evicts_the_coldest_entry():
    cache = TextVectorCache(None, namespace=namespace(), capacity=2)
    encode = CountingEncoder()
    for text in ("a", "b", "a", "c"):
        cache.get_or_compute([text], encode)
    cache.get_or_compute(["a"], encode)
    cache.get_or_compute(["b"], encode)
    assert encode.calls == [["a"], ["b"], ["c"], ["b"]]


def test_persisted_vectors_survive_a_restart_and_a_new_prompt_version_re_embeds(tmp_path):
    path = tmp_path / "text-vectors.sqlite"
    encode = CountingEncoder()
    TextVectorCache(path, namespace=namespace("1"), capacity=10).get_or_compute(["red circle", "blue"], encode)
    reopened = TextVectorCache(path, namespace=namespace("1"), capacity=10)
    reopened.get_or_compute(["red circle", "blue"], encode)
    assert encode.calls == [["red circle", "blue"]]
    assert reopened.persisted_count() == 2
    TextVectorCache(path, namespace=namespace("2"), capacity=10).get_or_compute(["red circle"], encode)
    assert encode.calls[-1] == ["red circle"]


def test_a_failed_computation_reaches_every_waiter_and_is_not_cached():
    cache = TextVectorCache(None, namespace=namespace(), capacity=10)

    def broken(texts):
        raise RuntimeError("model exploded")

    try:
        cache.get_or_compute(["x"], broken)
    except RuntimeError as exc:
        assert "model exploded" in str(exc)
    encode = CountingEncoder()
    cache.get_or_compute(["x"], encode)
    assert encode.calls == [["x"]]
