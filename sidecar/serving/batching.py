"""Dynamic micro-batching: concurrent requests share forward passes on one model thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

from sidecar.errors import EncodeTimeout, Overloaded
from sidecar.serving import metrics

log = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass
class _Work(Generic[Item]):
    items: Sequence[Item]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Item]):
    """Gathers up to `max_batch` items, or waits at most `max_wait_ms` after the first (only under
    load), then runs
    `forward(items) -> [n, dim] array` once and hands each caller its own rows.

    The queue is bounded: a full queue answers Overloaded (503) instead of growing. A batch
    that fails is retried request by request, so one bad input fails only its own request.
    """

    def __init__(self, forward: Callable[[Sequence[Item]], np.ndarray], *, modality: str,
                 max_batch: int, max_wait_ms: float, queue_size: int):
        self._forward = forward
        self.modality = modality
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Work | None] = queue.Queue(maxsize=queue_size)
        self._carry: _Work | None = None  # a request that did not fit in the last batch
        self._last_batch_requests = 0
        self._thread = threading.Thread(target=self._run, name=f"batcher-{modality}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[Item], *, timeout_s: float) -> np.ndarray:
        """Encode `items` within `timeout_s`; rows come back in the order given."""
        work = _Work(items)
        try:
            self._queue.put_nowait(work)
        except queue.Full as exc:
            raise Overloaded(f"{self.modality} encode queue is full ({self._queue.maxsize} requests waiting); "
                             "retry shortly", retry_after_s=1.0) from exc
        metrics.QUEUE_DEPTH.labels(self.modality).set(self._queue.qsize())
        try:
            return work.future.result(timeout=timeout_s)
        except FutureTimeout as exc:
            work.future.cancel()  # the model thread skips it if it has not started
            raise EncodeTimeout(f"{self.modality} encode took longer than request_timeout_s={timeout_s}") from exc

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._execute(batch)

    def _gather(self) -> list[_Work] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, size = [first], len(first.items)
        # Wait for company only under load (requests queued, or the last batch was shared):
        # a lone request at low traffic runs at once instead of paying max_wait_ms.
        under_load = self._queue.qsize() > 0 or self._last_batch_requests > 1
        deadline = time.perf_counter() + (self.max_wait_s if under_load else 0.0)
        while size < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                work = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if work is None:
                self._queue.put(None)  # keep the stop signal for the next loop
                break
            if size + len(work.items) > self.max_batch:
                self._carry = work
                break
            batch.append(work)
            size += len(work.items)
        metrics.QUEUE_DEPTH.labels(self.modality).set(self._queue.qsize())
        self._last_batch_requests = len(batch)
        return batch

    def _execute(self, batch: list[_Work]) -> None:
        live = [work for work in batch if work.future.set_running_or_notify_cancel()]
        if not live:
            return
        now = time.perf_counter()
        for work in live:
            metrics.STAGE_SECONDS.labels("queue_wait", self.modality).observe(now - work.enqueued)
        items = [item for work in live for item in work.items]
        try:
            rows = self._forward_timed(items)
        except Exception as exc:  # noqa: BLE001 - isolate the failing request below
            if len(live) == 1:
                self._fail(live[0], exc)
                return
            log.warning("%s batch of %d requests failed; retrying them one by one", self.modality, len(live))
            for work in live:
                self._execute_one(work)
            return
        start = 0
        for work in live:
            work.future.set_result(rows[start:start + len(work.items)])
            start += len(work.items)

    def _execute_one(self, work: _Work) -> None:
        try:
            work.future.set_result(self._forward_timed(work.items))
        except Exception as exc:  # noqa: BLE001
            self._fail(work, exc)

    def _fail(self, work: _Work, exc: Exception) -> None:
        log.error("%s encode failed for a request of %d items: %s", self.modality, len(work.items), exc)
        work.future.set_exception(exc)

    def _forward_timed(self, items: Sequence[Item]) -> np.ndarray:
        metrics.BATCH_SIZE.labels(self.modality).observe(len(items))
        with metrics.STAGE_SECONDS.labels("forward", self.modality).time():
            # A request larger than max_batch still runs in max_batch-sized passes.
            parts = [self._forward(items[i:i + self.max_batch]) for i in range(0, len(items), self.max_batch)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
