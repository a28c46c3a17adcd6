"""ANN validation: Recall@K of the store's HNSW against its exact search, with latency percentiles."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from sidecar.stores.base import Store


@dataclass(frozen=True, slots=True)
class RecallReport:
    k: int
    queries: int
    recall: float
    ann_ms: tuple[float, float]  # p50, p95
    exact_ms: tuple[float, float]

    def describe(self) -> str:
        return (f"Recall@{self.k} (HNSW vs exact) over {self.queries} queries: {self.recall:.4f}\n"
                f"latency p50/p95: HNSW {self.ann_ms[0]:.2f}/{self.ann_ms[1]:.2f} ms, "
                f"exact {self.exact_ms[0]:.2f}/{self.exact_ms[1]:.2f} ms")


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    values = np.asarray(samples_s) * 1000.0
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def ann_recall(store: Store, *, queries: int, k: int, seed: int = 0) -> RecallReport:
    """Stored vectors (sampled by seed) query both searches; recall = overlap of the two top-k."""
    ids = sorted(store.content_hashes())
    if not ids:
        raise ValueError("the store is empty: index something first")
    sample = random.Random(seed).sample(ids, min(queries, len(ids)))
    vectors = [doc.vector for doc in store.fetch(sample)]
    hits, ann_times, exact_times = 0, [], []
    for vector in vectors:
        started = time.perf_counter()
        approx = {hit.id for hit in store.vector_search(vector, k)}
        ann_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        exact = {hit.id for hit in store.vector_search(vector, k, exact=True)}
        exact_times.append(time.perf_counter() - started)
        hits += len(approx & exact)
    return RecallReport(k=k, queries=len(vectors), recall=hits / (len(vectors) * min(k, len(ids))),
                        ann_ms=percentiles(ann_times), exact_ms=percentiles(exact_times))
