"""The last hour of the Prometheus series, for people without Grafana (`GET /v1/status`).

Read from the very series `/metrics` exposes — in multiprocess mode, every worker's, from the files
in PROMETHEUS_MULTIPROC_DIR — so the worker that answers reports the whole server, as a scrape
does, not its own share of the traffic. Counters and histogram buckets only grow (a dead worker's
stay in the files), so the figures of a window are the difference between now and a snapshot taken
about `window_s` ago; each worker takes a snapshot every `every_s` on a daemon thread. A worker
younger than the window reports the time it has seen (`window_s` in the answer).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from typing import Any, Callable

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from sidecar.serving.metrics import MULTIPROC_ENV
from sidecar.threads import NamedThread

log = logging.getLogger(__name__)

# The series the window keeps: per-stage and per-request latency, requests by status, live recall.
FAMILIES = ("sidecar_stage_seconds", "sidecar_request_seconds", "sidecar_requests", "sidecar_ann_recall_hits",
            "sidecar_ann_recall_expected", "sidecar_shadow_checks", "sidecar_hard_examples")
Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


def read_series() -> dict[Key, float]:
    """The current value of every sample of FAMILIES (all workers' in multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    values: dict[Key, float] = {}
    for family in registry.collect():
        if family.name not in FAMILIES:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets: linear
    interpolation inside the bucket holding the q-th observation; None without observations."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # past the highest finite bound: that bound, as Prometheus answers
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


class MetricWindow:
    """Snapshots of `read` every `every_s`, kept for `window_s`; `summary()` is the window's figures."""

    def __init__(self, *, window_s: float = 3600.0, every_s: float = 60.0,
                 read: Callable[[], dict[Key, float]] = read_series, clock: Callable[[], float] = time.time):
        self.window_s = window_s
        self.every_s = every_s
        self._read = read
        self._clock = clock
        self._snapshots: collections.deque[tuple[float, dict[Key, float]]] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.take_snapshot()

    def start(self) -> None:
        self._thread = NamedThread(target=self._run, name="metric-window", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.take_snapshot()

    def take_snapshot(self) -> None:
        now = self._clock()
        try:
            values = self._read()
        except Exception as exc:  # noqa: BLE001 - one failed read must end neither the snapshots nor the worker's boot
            # A multiprocess file caught while a new worker creates it (empty) fails a read once; the next snapshot
            # reads it whole. Raised, it ended the snapshot thread (the window's base stayed its last snapshot:
            # an ever longer "last hour"), or at boot the worker, and gunicorn stopped the server.
            log.warning("metric window: a snapshot of the series failed (%s: %s); the next is taken in %g s",
                        type(exc).__name__, exc, self.every_s)
            return
        with self._lock:
            self._snapshots.append((now, values))
            # Keep the newest snapshot at least window_s old (the baseline) and everything after it.
            while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - self.window_s:
                self._snapshots.popleft()

    def summary(self) -> dict[str, Any]:
        """Over the window: live Recall@K (hits / expected of the shadow checks, with their counts),
        p50/p95 and count per stage, requests, 5xx and p95 per endpoint, hard-example checks by outcome."""
        now, current = self._clock(), self._read()
        with self._lock:
            old = [snap for snap in self._snapshots if snap[0] <= now - self.window_s]
            # No snapshot yet (the first read failed at boot): nothing counted over an empty window.
            since, base = old[-1] if old else self._snapshots[0] if self._snapshots else (now, current)
        delta = {key: value - base.get(key, 0.0) for key, value in current.items()}

        def total(name: str, **labels: str) -> float:
            return sum(v for (n, ls), v in delta.items() if n == name and all(dict(ls).get(k) == w
                                                                                 for k, w in labels.items()))

        hits, expected = total("sidecar_ann_recall_hits_total"), total("sidecar_ann_recall_expected_total")
        checks = {outcome: int(total("sidecar_shadow_checks_total", outcome=outcome))
                  for outcome in ("checked", "dropped", "failed")}
        return {
            "window_s": round(now - since, 1),
            "recall": {"value": hits / expected if expected else None, "hits": int(hits), "expected": int(expected),
                       **checks},
            "stages": _latencies(delta, "sidecar_stage_seconds", ("stage", "modality", "model")),
            "requests": _requests(delta),
            "hard_examples": {outcome: int(total("sidecar_hard_examples_total", outcome=outcome))
                              for outcome in ("logged", "repeated", "skipped", "dropped", "too_large")},
        }


def _latencies(delta: dict[Key, float], family: str, label_names: tuple[str, ...]) -> list[dict[str, Any]]:
    """p50/p95 (ms) and count per label combination of a histogram's window."""
    buckets: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for (name, labels), value in delta.items():
        if name == f"{family}_bucket":
            named = dict(labels)
            group = tuple(named.get(label, "") for label in label_names)
            buckets.setdefault(group, []).append((float(named["le"]), value))
    rows = []
    for group, counts in sorted(buckets.items()):
        count = max(c for _, c in counts)
        if count <= 0:
            continue
        p50, p95 = (histogram_quantile(q, counts) for q in (0.5, 0.95))
        rows.append({**dict(zip(label_names, group)), "count": int(count), "p50_ms": _ms(p50), "p95_ms": _ms(p95)})
    return rows


def _requests(delta: dict[Key, float]) -> list[dict[str, Any]]:
    counts: dict[str, dict[str, float]] = {}
    for (name, labels), value in delta.items():
        if name == "sidecar_requests_total" and value > 0:
            named = dict(labels)
            row = counts.setdefault(named["endpoint"], {"count": 0.0, "errors": 0.0})
            row["count"] += value
            if named["status"].startswith("5"):
                row["errors"] += value
    latency = {row["endpoint"]: row for row in _latencies(delta, "sidecar_request_seconds", ("endpoint",))}
    return [{"endpoint": endpoint, "count": int(row["count"]), "errors_5xx": int(row["errors"]),
             "p95_ms": latency.get(endpoint, {}).get("p95_ms")} for endpoint, row in sorted(counts.items())]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)
