import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import REGISTRY

from sidecar.errors import EncodeTimeout, NotReady, Overloaded
from sidecar.serving.batching import ForwardRowMismatch, MicroBatcher
from tests.support import ThreadKiller

KILL = 666  # the item on which RecordingForward ends the model thread


class RecordingForward:
    """Deterministic stand-in model: row for item x is [x, 2x]; fails on negative items; raises
    ThreadKiller on KILL."""

    def __init__(self, delay_s: float = 0.0):
        self.batch_sizes: list[int] = []
        self.delay_s = delay_s
        self.entered = threading.Event()  # set once a forward has started (before the gate)
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items):
        self.entered.set()
        self.gate.wait()
        self.batch_sizes.append(len(items))
        if KILL in items:
            raise ThreadKiller("injected")
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        time.sleep(self.delay_s)
        return np.array([[x, 2 * x] for x in items], dtype=np.float32)


@pytest.fixture
def forward():
    return RecordingForward(delay_s=0.01)


def make(forward, **kwargs):
    options = dict(modality="text", max_batch=32, max_wait_ms=5, queue_items=1000) | kwargs
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


def test_the_queue_bound_counts_items_not_requests(forward):
    batcher = make(forward, queue_items=4, max_batch=1)
    forward.gate.clear()
    try:
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(batcher.submit, [1], timeout_s=10)
            forward.entered.wait(5)  # [1] is in the forward, no longer waiting
            three = pool.submit(batcher.submit, [2, 3, 4], timeout_s=10)
            time.sleep(0.05)  # [2, 3, 4] queued: 3 items wait
            with pytest.raises(Overloaded, match=r"3 items waiting, 2 more would pass the limit of 4 \(queue_items\)") \
                    as info:
                batcher.submit([5, 6], timeout_s=10)
            assert info.value.retry_after_s is not None and info.value.status == 503
            fits = pool.submit(batcher.submit, [5], timeout_s=10)  # 3 + 1 items: within the bound
            time.sleep(0.05)
            forward.gate.set()
            assert running.result()[0, 0] == 1 and fits.result()[0, 0] == 5
            np.testing.assert_array_equal(three.result()[:, 0], [2, 3, 4])
        # A request larger than the bound still runs when nothing else waits.
        np.testing.assert_array_equal(batcher.submit(list(range(10)), timeout_s=10)[:, 0], np.arange(10))
    finally:
        forward.gate.set()
        batcher.close()


def test_a_dead_model_thread_fails_waiting_and_later_requests_at_once_with_503(forward):
    batcher = make(forward, max_batch=1)
    stops: list[str] = []
    batcher.on_stop(stops.append)
    forward.gate.clear()
    try:
        with ThreadPoolExecutor(4) as pool:
            dying = pool.submit(batcher.submit, [KILL], timeout_s=60)
            forward.entered.wait(5)
            queued = pool.submit(batcher.submit, [1], timeout_s=60)  # behind it, in the queue
            time.sleep(0.05)
            forward.gate.set()
            # Both answer long before their 60 s deadline: nobody waits on a dead thread.
            for request in (dying, queued):
                with pytest.raises(NotReady, match="ThreadKiller: injected") as info:
                    request.result(timeout=10)
                assert info.value.status == 503 and info.value.retry_after_s is not None
        assert batcher.stopped is not None and "text encode thread stopped" in batcher.stopped
        with pytest.raises(NotReady, match="ThreadKiller"):
            batcher.submit([2], timeout_s=60)
        assert stops == [batcher.stopped]
    finally:
        forward.gate.set()
        batcher.close()


def test_the_stop_counter_reads_0_from_the_start_and_1_after_the_thread_dies(forward):
    # An increase() alert takes a series's first sample as its base: one first exported at 1 never fires.
    labels = {"modality": "stop-counter", "model": "coarse"}
    batcher = make(forward, modality="stop-counter")
    try:
        before = REGISTRY.get_sample_value("sidecar_batcher_stops_total", labels)
        with pytest.raises(NotReady):
            batcher.submit([KILL], timeout_s=60)
        assert (before, REGISTRY.get_sample_value("sidecar_batcher_stops_total", labels)) == (0.0, 1.0)
    finally:
        batcher.close()


def test_a_forward_returning_the_wrong_row_count_fails_its_requests_instead_of_misrouting_rows():
    def drops_the_first_row(items):
        time.sleep(0.02)  # long enough for the other requests to queue into one batch
        return np.array([[x, 2 * x] for x in items[1:]], dtype=np.float32)

    batcher = MicroBatcher(drops_the_first_row, modality="text", max_batch=32, max_wait_ms=50, queue_items=100)
    try:
        with ThreadPoolExecutor(4) as pool:
            requests = [pool.submit(batcher.submit, [i], timeout_s=10) for i in (1, 2, 3)]
            for request in requests:
                with pytest.raises(ForwardRowMismatch, match=r"the text forward returned \d+ rows for \d+ items"):
                    request.result()
        assert batcher.stopped is None  # a broken forward fails requests; it does not stop the thread
    finally:
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


def test_a_coarse_and_a_fine_batcher_keep_their_own_queue_depth(forward):
    def sample(name: str, role: str) -> float:
        return REGISTRY.get_sample_value(name, {"modality": "text", "model": role}) or 0.0

    # The same modality in one process, as a worker with a fine model runs them: the fine batcher
    # holds a waiting request while the coarse one empties its queue.
    fine = make(forward, role="fine")
    coarse = make(RecordingForward(), role="coarse")
    forward.gate.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(fine.submit, [1], timeout_s=10)
            forward.entered.wait(5)  # [1] is in the fine forward
            waiting = pool.submit(fine.submit, [2, 3], timeout_s=10)
            time.sleep(0.05)  # [2, 3] queued behind it
            coarse.submit([4], timeout_s=10)
            assert sample("sidecar_queue_depth", "fine") == 2  # not overwritten by the coarse batcher's 0
            assert sample("sidecar_queue_depth", "coarse") == 0
            forward.gate.set()
            running.result(), waiting.result()
        # And their model threads are told apart in `top -H` and py-spy.
        assert (coarse._thread.name, fine._thread.name) == ("batcher-text", "fine-text")
    finally:
        forward.gate.set()
        fine.close()
        coarse.close()
