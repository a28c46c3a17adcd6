"""Search effort for a recall target: what a calibration chose, and how a store applies it to queries.

A calibration (`sidecar.retrieval.calibration`) measures, on a sample of the store's own vectors,
the lowest HNSW breadth (efSearch) whose Recall@K against exact search reaches a target, or finds
exact search cheaper. The store saves the result beside its data (the embedded store in a file,
OpenSearch in the index's `_meta`), so every process serving it applies the same effort, and
`EffortPolicy` turns it into the effort of each query that names no `ef_search` of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

# How often a serving process looks again for a calibration saved by another process (`index`,
# `store calibrate`): a file read (embedded) or one mapping request (OpenSearch).
REFRESH_S = 10.0


@dataclass(frozen=True, kw_only=True)
class EffortPoint:
    """One effort measured by a calibration: Recall@K against exact search on the sample, the
    lower end of its one-sided 95 % confidence interval (the lower of the sample's two halves), and
    the search latency it cost."""

    ef_search: int
    recall: float
    lower_bound: float
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True, kw_only=True)
class SearchEffort:
    """A calibration's result: the effort queries get for `target_recall` at `k`."""

    target_recall: float
    k: int
    depth: int  # results each measured search asked for: the candidates searches ask for (they run at least this wide)
    ef_search: int | None  # None: exact search (cheaper than the ANN effort that reaches the target, or none did)
    recall: float  # on the sample, at the chosen effort (1.0 for exact search)
    p50_ms: float  # latency of one search at the chosen effort
    p95_ms: float
    exact_p50_ms: float
    exact_p95_ms: float
    reason: str  # why this effort, in a sentence
    queries: int  # stored vectors searched for (the sample)
    documents: int  # in the store when it was calibrated
    calibrated_at: float  # Unix time
    curve: tuple[EffortPoint, ...] = ()  # every effort measured, ascending

    @property
    def exact(self) -> bool:
        return self.ef_search is None

    def matches(self, *, target_recall: float, k: int) -> bool:
        return self.target_recall == target_recall and self.k == k

    def describe(self) -> str:
        chosen = "exact search" if self.exact else f"ef_search {self.ef_search}"
        lines = [f"target Recall@{self.k} {self.target_recall:g}: {chosen} ({self.reason})",
                 f"measured {self.depth} deep, as searches run (the candidates they ask for; efSearch is at least that)",
                 f"recall on {self.queries} stored vectors (of {self.documents} documents): {self.recall:.4f}; "
                 f"latency p50/p95 {self.p50_ms:.2f}/{self.p95_ms:.2f} ms (exact search "
                 f"{self.exact_p50_ms:.2f}/{self.exact_p95_ms:.2f} ms)"]
        lines += [f"  ef_search {p.ef_search:5d}: recall {p.recall:.4f} (>= {p.lower_bound:.4f} at 95 %), "
                  f"p50/p95 {p.p50_ms:.2f}/{p.p95_ms:.2f} ms" for p in self.curve]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchEffort:
        values = dict(data)
        values.setdefault("depth", values["k"])  # saved before the depth was recorded: measured k deep
        values["curve"] = tuple(EffortPoint(**point) for point in values.get("curve", ()))
        return cls(**values)


class EffortPolicy:
    """The effort a store gives a query that names no `ef_search`: the saved calibration's, when the
    store has a recall target and a calibration for that target and k; else the store's fixed
    `default_ef`. `load`/`save` read and write the store's saved calibration (None: there is none);
    what another process saved is picked up within `refresh_s`."""

    def __init__(self, *, target_recall: float, k: int, default_ef: int,
                 load: Callable[[], dict[str, Any] | None], save: Callable[[dict[str, Any]], None],
                 refresh_s: float = REFRESH_S):
        self.target_recall = target_recall
        self.k = k
        self.default_ef = default_ef
        self._load = load
        self._save = save
        self._refresh_s = refresh_s
        self._saved: SearchEffort | None = None
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    def saved(self) -> SearchEffort | None:
        """The store's saved calibration (whatever its target), read again every `refresh_s`."""
        now = time.monotonic()
        if self._loaded_at is not None and now - self._loaded_at < self._refresh_s:
            return self._saved
        with self._lock:
            if self._loaded_at is None or now - self._loaded_at >= self._refresh_s:
                try:
                    data = self._load()
                    self._saved = SearchEffort.from_json(data) if data else None
                except Exception as exc:  # noqa: BLE001 - a store that cannot answer now keeps the last effort
                    log.warning("could not read the saved search effort (keeping %s): %s",
                                "the last one" if self._saved else "the default", exc)
                self._loaded_at = now
        return self._saved

    def applied(self) -> SearchEffort | None:
        """The calibration queries get now, or None (no target, or no calibration for it)."""
        if not self.target_recall:
            return None
        saved = self.saved()
        return saved if saved is not None and saved.matches(target_recall=self.target_recall, k=self.k) else None

    def ef_search(self, requested: int | None) -> int:
        """The HNSW breadth of a query: its own, else the calibrated one, else the default."""
        if requested is not None:
            return requested
        applied = self.applied()
        return applied.ef_search if applied is not None and applied.ef_search is not None else self.default_ef

    def exact(self, requested_ef: int | None) -> bool:
        """Whether a query that asked for ANN runs exact instead: the calibration found exact search
        cheaper (or the only way to the target), and the query named no ef_search of its own."""
        if requested_ef is not None:
            return False
        applied = self.applied()
        return applied is not None and applied.exact

    def save(self, effort: SearchEffort) -> None:
        self._save(effort.to_json())
        with self._lock:
            self._saved, self._loaded_at = effort, time.monotonic()

    def status(self) -> dict[str, Any]:
        """What `/v1/status` and the CLI show: the target, the effort applied and why, the calibration."""
        saved = self.saved()
        applied = self.applied()
        if not self.target_recall:
            note = "no target_recall set: queries get the store's fixed ef_search"
        elif applied is None:
            found = (f"the saved calibration is for Recall@{saved.k} {saved.target_recall:g}" if saved
                     else "the store has no calibration")
            note = (f"{found}: queries get the store's fixed ef_search until `clip-sidecar store calibrate` "
                    f"(or an index run) calibrates for Recall@{self.k} {self.target_recall:g}")
        else:
            note = applied.reason
        return {"target_recall": self.target_recall or None, "k": self.k,
                "ef_search": None if self.exact(None) else self.ef_search(None), "exact": self.exact(None),
                "calibrated": applied is not None, "note": note,
                "calibration": saved.to_json() if saved else None}
