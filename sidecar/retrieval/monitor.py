"""Live Recall@K: a sampled share of real queries searched again, ANN and exact, off the request path.

A request that searched by vector offers its query here; a `fraction` of those the HNSW served (not
those the store's calibrated effort ran exactly) is handed to one background thread through a bounded
queue (full: the query is dropped and counted, never waited for), which runs the request's ANN search
again and the exact search, and records how many of the exact top K the ANN top K found (a tie with the
K-th counts: `evaluation.found_of_exact`). Summed over queries and workers (Prometheus counters of hits
and of expected hits), the ratio is the Recall@K the HNSW served, however its effort was chosen.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sidecar.retrieval.evaluation import found_of_exact
from sidecar.stores.base import Store
from sidecar.threads import NamedThread
from sidecar.types import Filters

log = logging.getLogger(__name__)

# A failing check (a store that cannot be reached, say) logs at most once a minute.
_WARN_EVERY_S = 60.0


class BackgroundChecks:
    """One daemon thread running checks off the request path. At most `capacity` checks wait; a
    check offered beyond that is refused at once (the caller counts it as dropped): under load the
    checks give way, the requests never wait for them. The thread starts with the first check."""

    def __init__(self, *, capacity: int, name: str = "quality-checks"):
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=capacity)
        self._name = name
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._last_warning = -_WARN_EVERY_S  # the first failure is logged however soon after boot it comes

    def submit(self, check: Callable[[], None]) -> bool:
        """Queue `check`; False (not queued) when `capacity` checks already wait."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = NamedThread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        try:
            self._queue.put_nowait(check)
        except queue.Full:
            return False
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every queued check finished within `timeout_s` (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, *, timeout_s: float = 10.0) -> None:
        """Run the checks queued, for at most `timeout_s` all told: a worker stopping waits no longer for them,
        whatever the store's searches cost (one that hangs, say), before it closes the rest of its app."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=timeout_s)  # behind the queued checks: a full queue waits for one to end
        except queue.Full:
            log.warning("background quality checks (%s): %d still queued after %g s are not run", self._name,
                        self._queue.qsize(), timeout_s)
            return
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            check = self._queue.get()
            try:
                if check is None:
                    return
                check()
            except Exception as exc:  # noqa: BLE001 - a failed check must not end the thread
                now = time.monotonic()
                if now - self._last_warning >= _WARN_EVERY_S:
                    self._last_warning = now
                    log.warning("a background quality check (%s) failed: %s: %s (more within a minute are not logged)",
                                self._name, type(exc).__name__, exc)
            finally:
                self._queue.task_done()


@dataclass(frozen=True, slots=True)
class RecallCheck:
    """One shadow check: `outcome` is checked, dropped (the queue was full) or failed (the store
    raised); `hits` of the exact top K were in the ANN top K, of `expected` (K, or fewer when the
    filters match fewer documents)."""

    outcome: str
    hits: int = 0
    expected: int = 0


class RecallMonitor:
    """Offers a `fraction` of the queries it is shown to `checks`, which measure their Recall@`k`
    on `store` and report each to `record`."""

    def __init__(self, store: Store, *, fraction: float, k: int, checks: BackgroundChecks,
                 record: Callable[[RecallCheck], None], seed: int | None = None):
        self.store = store
        self.fraction = fraction
        self.k = k
        self._checks = checks
        self._record = record
        self._random = random.Random(seed)

    def offer(self, vector: np.ndarray, *, candidates: int, filters: Filters | None = None,
              ef_search: int | None = None) -> None:
        """A query that asked for ANN (its `candidates` and `ef_search`, as the request had them). One the
        store ran exactly (its calibrated effort, for a query that names no ef_search; filters that match few
        documents, found in the background) is not checked: exact search against exact search would count as a
        perfect ANN recall where no ANN ran."""
        if self.fraction <= 0 or self._random.random() >= self.fraction:
            return
        if self.store.effort.exact(ef_search):
            return
        if not self._checks.submit(lambda: self._check(vector, candidates=candidates, filters=filters,
                                                       ef_search=ef_search)):
            self._record(RecallCheck("dropped"))

    def _check(self, vector: np.ndarray, *, candidates: int, filters: Filters | None, ef_search: int | None) -> None:
        try:
            if self.store.searches_exactly(filters):
                return  # filters matching few documents (or no graph yet): as under an exact effort, no ANN ran
            # The request's own ANN search (its depth decides the effective breadth), then its top K.
            approx = self.store.vector_search(vector, max(candidates, self.k), filters=filters,
                                              ef_search=ef_search)[:self.k]
            exact = self.store.vector_search(vector, self.k, filters=filters, exact=True)
        except Exception:
            self._record(RecallCheck("failed"))
            raise
        self._record(RecallCheck("checked", hits=found_of_exact(approx, exact), expected=len(exact)))
