import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sidecar.errors import EncodeTimeout, Overloaded
from sidecar.serving.batching import MicroBatcher


class RecordingForward:
    """Deterministic stand-in model: row for item x is [x, 2x]; fails on negative items."""

    def __init__(self, delay_s: float = 0.0):
        self.batch_sizes: list[int] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items):
        self.gate.wait()
        self.batch_sizes.append(len(items))
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        time.sleep(self.delay_s)
        return np.array([[x, 2 * x] for x in items], dtype=np.float32)


@pytest.fixture
def forward():
    return RecordingForward(delay_s=0.01)


def make(forward, **kwargs):
    options = dict(modality="text", max_batch=32, max_wait_ms=5, queue_size=1000) | kwargs
    return MicroBatcher(forward, **options)


def test_each_caller_gets_its_own_rows_in_order_and_requests_share_batches(forward):
    batcher = make(forward)
    try:
        requests = [[i * 10 + j for j in range(i % 3 + 1)] for i in range(64)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda items: batcher.submit(items, timeout_s=10), requests))
        for items, rows in zip(requests, results):
            np.testing.assert_array_equal(rows, [[x, 2 * x] for x in items])
        assert max(forward.batch_sizes) > 3, "concurrent requests should have been batched together"
        assert sum(forward.batch_sizes) == sum(len(r) for r in requests)
    finally:
        batcher.close()


def test_a_request_larger_than_max_batch_runs_in_max_batch_passes(forward):
    batcher = make(forward, max_batch=4)
    try:
        rows = batcher.submit(list(range(10)), timeout_s=10)
        np.testing.assert_array_equal(rows[:, 0], np.arange(10))
        assert max(forward.batch_sizes) <= 4
    finally:
        batcher.close()


def test_a_failing_item_fails_only_its_own_request(forward):
    batcher = make(forward, max_wait_ms=50)
    forward.gate.clear()  # hold the model so good and bad requests land in one batch
    try:
        with ThreadPoolExecutor(4) as pool:
            good = [pool.submit(batcher.submit, [i], timeout_s=10) for i in (1, 2, 3)]
            bad = pool.submit(batcher.submit, [-1], timeout_s=10)
            time.sleep(0.1)
            forward.gate.set()
            assert [f.result()[0, 0] for f in good] == [1, 2, 3]
            with pytest.raises(ValueError, match="negative input"):
                bad.result()
        # The model thread survives and keeps serving.
        assert batcher.submit([5], timeout_s=10)[0, 1] == 10
    finally:
        batcher.close()


def test_full_queue_answers_overloaded_with_retry_after(forward):
    batcher = make(forward, queue_size=1, max_batch=1)
    forward.gate.clear()
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(batcher.submit, [1], timeout_s=10)  # taken by the model thread
            time.sleep(0.05)
            second = pool.submit(batcher.submit, [2], timeout_s=10)  # fills the queue
            time.sleep(0.05)
            with pytest.raises(Overloaded, match="queue is full") as info:
                batcher.submit([3], timeout_s=10)
            assert info.value.retry_after_s is not None and info.value.status == 503
            forward.gate.set()
            assert first.result()[0, 0] == 1 and second.result()[0, 0] == 2
    finally:
        forward.gate.set()
        batcher.close()


def test_timeout_answers_encode_timeout(forward):
    batcher = make(forward)
    forward.gate.clear()
    try:
        with pytest.raises(EncodeTimeout, match="request_timeout_s=0.05") as info:
            batcher.submit([1], timeout_s=0.05)
        assert info.value.status == 504
    finally:
        forward.gate.set()
        batcher.close()
