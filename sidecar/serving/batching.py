"""Dynamic micro-batching: concurrent requests share forward passes on one model thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

from sidecar.errors import EncodeTimeout, NotReady, Overloaded
from sidecar.serving import metrics
from sidecar.threads import NamedThread

log = logging.getLogger(__name__)

Item = TypeVar("Item")


class ForwardRowMismatch(RuntimeError):
    """A forward pass returned another number of rows than it was given items: no caller can be
    handed its own vectors, so the requests of that pass fail instead."""


@dataclass(eq=False)  # compared by identity: the model thread tracks the requests it holds
class _Work(Generic[Item]):
    items: Sequence[Item]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Item]):
    """Gathers up to `max_batch` items, or waits at most `max_wait_ms` after the first (only under
    load), then runs `forward(items) -> rows` once (an [n, dim] array, or any sequence of n results)
    and hands each caller its own rows.

    Admission is bounded in items: a request whose items would take the waiting items over
    `queue_items` answers Overloaded (503) at once (a request is always admitted into an empty
    queue, so one larger than the bound still runs). A batch that fails is retried request by
    request, so one bad input fails only its own request. If the model thread itself dies (an
    error escapes its loop), every waiting request and every later one answers NotReady (503)
    at once, `stopped` says why, and the `on_stop` callbacks run (gunicorn replaces the worker).
    """

    def __init__(self, forward: Callable[[Sequence[Item]], Sequence], *, modality: str,
                 max_batch: int, max_wait_ms: float, queue_items: int, role: metrics.ModelRole = "coarse"):
        self._forward = forward
        self.modality = modality
        self.role = role  # the `model` label of this batcher's series
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_items = queue_items
        self._queue: queue.Queue[_Work | None] = queue.Queue()  # bounded by the admission count below
        self._admission = threading.Lock()  # guards _waiting_items, _stopped and _on_stop
        self._waiting_items = 0  # admitted, forward not started
        self._stopped: str | None = None  # why the model thread no longer runs
        self._closed = False
        self._on_stop: list[Callable[[str], None]] = []
        self._held: list[_Work] = []  # taken off the queue by the model thread, not yet answered
        self._carry: _Work | None = None  # a request that did not fit in the last batch
        self._last_batch_requests = 0
        # Series resolved once, not per request (labels() costs a lock and a lookup each time).
        self._queue_depth = metrics.QUEUE_DEPTH.labels(modality, role)
        self._queue_wait = metrics.STAGE_SECONDS.labels("queue_wait", modality, role)
        # The forward's own series (sidecar_batch_size, stage "forward") are the forward's to record
        # (metrics.ForwardSeries): a batch can hold items no model pass runs for (texts found in the
        # text-vector cache's file) and runs in several passes past max_batch.
        # Exported as 0 from the start: an alert on increase() sees a series's first sample as its base, so one
        # that first appears at 1 would never fire.
        self._stops = metrics.BATCHER_STOPS.labels(modality, role)
        # Named for `top -H` and py-spy: the fine model's model threads apart from the coarse model's.
        self._thread = NamedThread(target=self._supervise, name=f"{'batcher' if role == 'coarse' else role}-{modality}",
                                   daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> str | None:
        """None while the model thread runs; else why it stopped."""
        return self._stopped

    def on_stop(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` once the model thread stops for any reason but close() (at once
        if it already has)."""
        with self._admission:
            if self._stopped is None:
                self._on_stop.append(callback)
                return
            if self._closed:
                return
        callback(self._stopped)

    def submit(self, items: Sequence[Item], *, timeout_s: float) -> Sequence:
        """Encode `items` within `timeout_s`; rows come back in the order given."""
        work = _Work(items)
        with self._admission:
            if self._stopped is not None:
                raise NotReady(self._stopped, retry_after_s=1.0)
            waiting = self._waiting_items
            if waiting and waiting + len(items) > self.queue_items:
                raise Overloaded(f"{self.modality} encode queue is full: {waiting} items waiting, {len(items)} more "
                                 f"would pass the limit of {self.queue_items} (queue_items); retry shortly",
                                 retry_after_s=1.0)
            self._waiting_items += len(items)
            self._queue.put_nowait(work)
        self._queue_depth.set(waiting + len(items))
        try:
            return work.future.result(timeout=timeout_s)
        except FutureTimeout as exc:
            work.future.cancel()  # the model thread skips it if it has not started
            raise EncodeTimeout(f"{self.modality} encode took longer than request_timeout_s={timeout_s}") from exc

    def close(self) -> None:
        with self._admission:
            self._closed = True
            self._stopped = self._stopped or f"the {self.modality} encoder is shut down"
            self._on_stop.clear()
        self._queue.put(None)
        self._thread.join(timeout=5)

    # ---- the model thread ----
    def _supervise(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - whatever ends the loop, nobody may wait on it
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        model = " of the fine model" if self.role == "fine" else ""
        reason = (f"the {self.modality} encode thread{model} stopped ({type(exc).__name__}: {exc}); "
                  "this worker no longer serves encodes")
        log.critical("%s; failing its waiting requests with 503", reason, exc_info=exc)
        self._stops.inc()
        with self._admission:
            self._stopped = reason
            pending = list(self._held)
            while True:
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    pending.append(work)
            self._waiting_items = 0
            callbacks, self._on_stop = self._on_stop, []
        self._queue_depth.set(0)
        for work in pending:
            try:
                work.future.set_exception(NotReady(reason, retry_after_s=1.0))
            except InvalidStateError:
                pass  # answered or cancelled (timed out) already
        for callback in callbacks:
            callback(reason)

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._execute(batch)

    def _take(self, work: _Work | None) -> _Work | None:
        if work is not None:
            self._held.append(work)
        return work

    def _gather(self) -> list[_Work] | None:
        first = self._carry or self._take(self._queue.get())
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
                work = self._take(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
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
        self._last_batch_requests = len(batch)
        return batch

    def _execute(self, batch: list[_Work]) -> None:
        with self._admission:
            self._waiting_items -= sum(len(work.items) for work in batch)
            waiting = self._waiting_items
        self._queue_depth.set(waiting)
        live = [work for work in batch if work.future.set_running_or_notify_cancel()]
        if live:
            self._answer(live)
        # Answered (or cancelled); a death in _answer leaves them held, for _die to fail.
        self._held = [work for work in self._held if work not in batch]

    def _answer(self, live: list[_Work]) -> None:
        now = time.perf_counter()
        for work in live:
            self._queue_wait.observe(now - work.enqueued)
        items = [item for work in live for item in work.items]
        try:
            rows = self._forward_in_passes(items)
        except Exception as exc:  # noqa: BLE001 - isolate the failing request below
            if len(live) == 1:
                self._fail(live[0], exc)
                return
            log.warning("%s batch of %d requests failed (%s); retrying them one by one", self.modality, len(live), exc)
            for work in live:
                self._execute_one(work)
            return
        start = 0
        for work in live:
            work.future.set_result(rows[start:start + len(work.items)])
            start += len(work.items)

    def _execute_one(self, work: _Work) -> None:
        try:
            work.future.set_result(self._forward_in_passes(work.items))
        except Exception as exc:  # noqa: BLE001
            self._fail(work, exc)

    def _fail(self, work: _Work, exc: Exception) -> None:
        log.error("%s encode failed for a request of %d items: %s", self.modality, len(work.items), exc)
        work.future.set_exception(exc)

    def _forward_in_passes(self, items: Sequence[Item]) -> Sequence:
        # A request larger than max_batch still runs in max_batch-sized passes.
        parts = []
        for start in range(0, len(items), self.max_batch):
            chunk = items[start:start + self.max_batch]
            rows = self._forward(chunk)
            if len(rows) != len(chunk):
                raise ForwardRowMismatch(f"the {self.modality} forward returned {len(rows)} rows for "
                                         f"{len(chunk)} items")
            parts.append(rows)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [row for part in parts for row in part]
