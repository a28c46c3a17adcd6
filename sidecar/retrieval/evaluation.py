"""ANN validation: Recall@K of the store's HNSW against its exact search on fresh queries, with latency percentiles."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sidecar.stores.base import Store
from sidecar.types import ScoredId

# Two searches' scores of one vector differ by float32 rounding only: the HNSW kernel and the exact
# search's matrix product sum in different orders (at most 6e-8 apart at 128 to 1024 dimensions on the
# embedded store), and OpenSearch's float32 `1 + ip` score adds about 1e-7. 1e-5 is far above that and
# far below a difference of cosine that tells two images apart.
TIE_EPSILON = 1e-5


@dataclass(frozen=True, slots=True)
class RecallReport:
    k: int
    queries: int
    recall: float
    ann_ms: tuple[float, float]  # p50, p95
    exact_ms: tuple[float, float]
    ef_search: int  # the efSearch the HNSW ran at (at least k: the stores search at least as wide as they return)
    # The store's calibrated effort gives vector queries that name no ef_search exact search, not HNSW.
    queries_get_exact: bool = False

    def to_json(self) -> dict:
        return {"k": self.k, "queries": self.queries, "recall": self.recall, "ef_search": self.ef_search,
                "queries_get_exact": self.queries_get_exact,
                "ann_ms": dict(zip(("p50", "p95"), self.ann_ms)), "exact_ms": dict(zip(("p50", "p95"), self.exact_ms))}

    def describe(self) -> str:
        lines = [f"Recall@{self.k} (HNSW vs exact) over {self.queries} queries: {self.recall:.4f} at efSearch "
                 f"{self.ef_search}",
                 f"latency p50/p95: HNSW {self.ann_ms[0]:.2f}/{self.ann_ms[1]:.2f} ms, "
                 f"exact {self.exact_ms[0]:.2f}/{self.exact_ms[1]:.2f} ms"]
        if self.queries_get_exact:
            lines.append("vector queries that name no ef_search get exact search on this store (its calibrated "
                         "effort), not HNSW: the HNSW was measured at the store's fixed ef_search")
        return "\n".join(lines)


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    values = np.asarray(samples_s) * 1000.0
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def found_of_exact(approx: Sequence[ScoredId], exact: Sequence[ScoredId]) -> int:
    """How many of the exact top K (`exact`, best first) the ANN top K (`approx`) found: the Recall@K
    numerator. An ANN hit counts when it scores at least the exact K-th score (less TIE_EPSILON), not
    only when its id is in the exact top K: where the top K ends inside a group of equal scores (one
    image stored under several ids), which of the group's ids exact search keeps is arbitrary, and an
    equally good hit the ANN found instead is no miss."""
    if not exact:
        return 0
    floor = exact[-1].score - TIE_EPSILON
    return min(len(exact), sum(hit.score >= floor for hit in approx))


def ann_recall(store: Store, *, queries: int, k: int, seed: int = 0) -> RecallReport:
    """Recall@k of the store's ANN search against its exact search: the share of the exact top k the
    ANN top k found (`found_of_exact`), on `queries` stored vectors (sampled by seed) each turned into
    a fresh query as the calibration turns them (`calibration.fresh_queries`): a stored vector is a
    node of the HNSW graph, easy for the graph around it to find (3,000 uniform 32-d vectors at efSearch
    10: 0.46 on stored vectors, 0.24 on new queries, 0.29 on turned ones)."""
    from sidecar.retrieval.calibration import fresh_queries  # it imports this module

    sampled = fresh_queries(store, k=k, depth=k, queries=queries, seed=seed)
    # The effort queries get. Where the calibration turned them to exact search, a search naming no
    # ef_search would be exact too, and compared with exact search read 1.0: the HNSW runs at the
    # store's fixed effort then, and the report says which.
    queries_get_exact = store.effort.exact(None)
    ef_search = store.effort.default_ef if queries_get_exact else store.effort.ef_search(None)
    hits, ann_times = 0, []
    for vector, exact in zip(sampled.vectors, sampled.truth):
        started = time.perf_counter()
        approx = store.vector_search(vector, k, ef_search=ef_search)
        ann_times.append(time.perf_counter() - started)
        hits += found_of_exact(approx, exact)
    return RecallReport(k=k, queries=len(sampled.vectors), recall=hits / sum(len(exact) for exact in sampled.truth),
                        ann_ms=percentiles(ann_times), exact_ms=percentiles(sampled.exact_s),
                        ef_search=max(ef_search, k), queries_get_exact=queries_get_exact)
