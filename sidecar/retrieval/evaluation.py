"""ANN validation: Recall@K of the store's HNSW against its exact search on fresh queries, with latency percentiles."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

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
    ef_search: int  # the efSearch the HNSW ran at (at least depth: the stores search at least as wide as they return)
    depth: int  # results each search asked for: the candidates searches ask for, as they run
    # The store's calibrated effort gives vector queries that name no ef_search exact search, not HNSW.
    queries_get_exact: bool = False

    def to_json(self) -> dict:
        return {"k": self.k, "queries": self.queries, "recall": self.recall, "ef_search": self.ef_search,
                "depth": self.depth, "queries_get_exact": self.queries_get_exact,
                "ann_ms": dict(zip(("p50", "p95"), self.ann_ms)), "exact_ms": dict(zip(("p50", "p95"), self.exact_ms))}

    def describe(self) -> str:
        lines = [f"Recall@{self.k} (HNSW vs exact) over {self.queries} queries: {self.recall:.4f} at efSearch "
                 f"{self.ef_search}, each search {self.depth} deep",
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


@dataclass(frozen=True, slots=True)
class FreshQueries:
    """Queries made of a store's own vectors (`fresh_queries`), each with its exact top K."""

    vectors: list[np.ndarray]
    truth: list[list[ScoredId]]  # the exact top K of each
    along: list[bool]  # turned along the data (towards its neighbours), else in any direction
    exact_s: list[float]  # the exact search of each, `depth` deep
    documents: int  # in the store when sampled


def fresh_queries(store: Store, *, k: int, depth: int, queries: int, seed: int = 0,
                  progress: bool = False) -> FreshQueries:
    """`queries` stored vectors (sampled by seed), each turned into a fresh query (see `calibration`'s
    docstring: a stored vector itself is an easy one), half in any direction and half along the data,
    with its exact top `k` from an exact search `depth` deep."""
    ids = sorted(store.content_hashes())
    if not ids:
        raise ValueError("the store is empty: index something first")
    sample = random.Random(seed).sample(ids, min(queries, len(ids)))
    rng = np.random.default_rng((seed, 0xCA11B))  # not the stream of a data set generated with `seed`
    vectors: list[np.ndarray] = []
    truth: list[list[ScoredId]] = []
    along: list[bool] = []
    exact_s: list[float] = []
    for doc in tqdm(store.fetch(sample), desc="exact search (the truth)", unit="query", disable=not progress):
        if not doc.vector.size:
            continue  # written by OpenSearch's ingest pipeline without one (a document it could not embed)
        neighbours = [hit for hit in store.vector_search(doc.vector, k + 1, exact=True) if hit.id != doc.id]
        if not neighbours:
            continue  # a store of one document
        # Fresh queries of uniform data come from any direction; of data of low intrinsic dimension (CLIP's),
        # along the data, where a query turned in any direction is easier than a new one. Half of each:
        # the target must be reached on both halves.
        towards = None
        if len(vectors) % 2:
            towards = np.stack([np.asarray(d.vector, dtype=np.float32)
                                for d in store.fetch([hit.id for hit in neighbours[:k]])])
        vector = fresh_query(np.asarray(doc.vector, dtype=np.float32), neighbours[:k][-1].score, rng, towards)
        along.append(towards is not None)
        started = time.perf_counter()
        hits = store.vector_search(vector, depth, exact=True)
        exact_s.append(time.perf_counter() - started)  # the cost of exact search, where no effort reaches the target
        vectors.append(vector)
        truth.append(hits[:k])
    if not vectors:
        raise ValueError("the store holds one document: there is no neighbour to measure recall against")
    return FreshQueries(vectors=vectors, truth=truth, along=along, exact_s=exact_s, documents=len(ids))


def fresh_query(vector: np.ndarray, nearest_cosine: float, rng: np.random.Generator,
                towards: np.ndarray | None = None) -> np.ndarray:
    """`vector` (a unit vector) turned by the angle whose cosine is `nearest_cosine`, towards a random
    direction orthogonal to it (a random mix of the rows of `towards` less `vector`, where given): a
    unit vector that far from `vector`."""
    if towards is None:
        direction = rng.standard_normal(vector.shape[0]).astype(np.float32)
    else:
        direction = (rng.standard_normal(len(towards)) @ (towards - vector)).astype(np.float32)
    direction -= float(direction @ vector) * vector
    direction /= max(float(np.linalg.norm(direction)), 1e-12)
    cosine = float(np.clip(nearest_cosine, -1.0, 1.0))
    turned = cosine * vector + np.sqrt(1.0 - cosine * cosine) * direction
    return (turned / max(float(np.linalg.norm(turned)), 1e-12)).astype(np.float32)


def ann_recall(store: Store, *, queries: int, k: int, depth: int | None = None, seed: int = 0,
               progress: bool = False) -> RecallReport:
    """Recall@k of the store's ANN search against its exact search: the share of the exact top k the
    ANN top k found (`found_of_exact`), on `queries` stored vectors (sampled by seed) each turned into
    a fresh query (`fresh_queries`, as the calibration's are): a stored vector is a
    node of the HNSW graph, easy for the graph around it to find (3,000 uniform 32-d vectors at efSearch
    10: 0.46 on stored vectors, 0.24 on new queries, 0.29 on turned ones). Each search asks for `depth`
    results (default k): the candidates a search asks for, which the stores search at least as wide as
    (efSearch = max(ef_search, depth)), so the HNSW runs at the effort searches get."""
    depth = max(depth or k, k)
    sampled = fresh_queries(store, k=k, depth=depth, queries=queries, seed=seed, progress=progress)
    # The effort queries get. Where the calibration turned them to exact search, a search naming no
    # ef_search would be exact too, and compared with exact search read 1.0: the HNSW runs at the
    # store's fixed effort then, and the report says which.
    queries_get_exact = store.effort.exact(None)
    ef_search = store.effort.default_ef if queries_get_exact else store.effort.ef_search(None)
    hits, ann_times = 0, []
    for vector, exact in zip(sampled.vectors, sampled.truth):
        started = time.perf_counter()
        approx = store.vector_search(vector, depth, ef_search=ef_search)[:k]
        ann_times.append(time.perf_counter() - started)
        hits += found_of_exact(approx, exact)
    return RecallReport(k=k, queries=len(sampled.vectors), recall=hits / sum(len(exact) for exact in sampled.truth),
                        ann_ms=percentiles(ann_times), exact_ms=percentiles(sampled.exact_s),
                        ef_search=max(ef_search, depth), depth=depth, queries_get_exact=queries_get_exact)
