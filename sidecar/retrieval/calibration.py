"""Calibrate a store's search effort for a recall target, on a sample of its own vectors.

A stored vector is an easy query: the HNSW graph was built around it, its neighbours are its graph
neighbours (on 10k uniform 64-d vectors, 0.99 recall on stored vectors at efSearch 31 was 0.82 on
fresh ones). So each sampled stored vector x becomes a fresh query (`evaluation.fresh_queries`, which
`eval --ann` measures on too): x turned, in a random
direction, by the angle between x and its K-th nearest neighbour — a point about as far from the
data as a new draw from the same distribution, a little farther (on that set, recall on such
queries was within 0.005 of fresh draws' from efSearch 32 up, and below it under 32). Each such
query is searched exactly (the truth) and by HNSW at growing efSearch, each `depth` deep: the candidates
(N) a search asks the store for, which searches at least N wide (efSearch = max(ef_search, N)), so an
effort measured K deep would not be the one searches run at. Recall@K is the share of the exact top K
the top K of the ANN search found (a tie with the K-th counts: `evaluation.found_of_exact`). A random
direction of the whole space suits uniform data, but leaves data of low intrinsic dimension (CLIP's):
such a query stays nearest x and is easier than a new one (20k structured 512-d vectors: efSearch 16
chosen, 0.972 on fresh draws for a 0.99 target). So every other query turns towards a random mix of x's
K neighbours instead, along the data, and the target must be reached on each half. The effort chosen is
the lowest efSearch whose recall reaches the target with 95 % confidence (the lower end of a one-sided
Wilson interval, so a sample that happens to be easy does not pick an effort that misses the target on
the next queries), found by doubling and then bisecting to within 1/16, never under the depth (an effort under it
runs as the depth); exact search where it is as fast as that effort (both timed `depth` deep), or where no efSearch up to
MAX_EF_SEARCH reaches the target. The store saves the result (`sidecar.stores.effort`). The live
monitor (`sidecar.retrieval.monitor`) then measures the recall real queries get.
"""

from __future__ import annotations

import logging
import math
import time

from tqdm import tqdm

from sidecar.config import Settings
from sidecar.retrieval.evaluation import found_of_exact, fresh_queries, percentiles
from sidecar.stores.base import Store
from sidecar.stores.effort import EffortPoint, SearchEffort

log = logging.getLogger(__name__)

MAX_EF_SEARCH = 4096  # the widest HNSW search a calibration tries (and a request may ask for)
FIRST_EF_SEARCH = 16
CONFIDENCE_Z = 1.645  # one-sided 95 %
# An index run that wrote or deleted at least this share of the documents a calibration saw (or
# changed their count by as much) calibrates again (`recalibrate_if_changed`).
RECALIBRATE_FRACTION = 0.1


def wilson_lower_bound(hits: int, total: int, *, z: float = CONFIDENCE_Z) -> float:
    """The lower end of the Wilson score interval for hits/total (one-sided at z)."""
    if total == 0:
        return 0.0
    p = hits / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, (centre - spread) / (1 + z * z / total))


def calibrate(store: Store, *, target_recall: float, k: int = 10, depth: int = Settings.rerank_candidates,
              queries: int = 300, seed: int = 0, max_ef: int = MAX_EF_SEARCH, allow_exact: bool = True,
              progress: bool = False) -> SearchEffort:
    """Measure the lowest effort that reaches `target_recall` (Recall@`k` against exact search) on
    `queries` stored vectors, each searched `depth` deep (the candidates searches ask for: the
    rerank_candidates setting; at least `k`), and return it (the caller saves it: `store.effort.save`).
    `allow_exact=False` keeps the ANN even where exact search measures as fast (exact search reads
    every vector: on a shared cluster its cost is not only this query's latency)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    depth = max(depth, k)  # Recall@k reads k hits
    sampled = fresh_queries(store, k=k, depth=depth, queries=queries, seed=seed, progress=progress)
    vectors, truth, along, exact_s = sampled.vectors, sampled.truth, sampled.along, sampled.exact_s
    measured: dict[int, EffortPoint] = {}

    def measure(ef: int) -> EffortPoint:
        if ef not in measured:
            hits, total = {False: 0, True: 0}, {False: 0, True: 0}
            seconds = []
            for vector, expected, half in zip(vectors, truth, along):
                started = time.perf_counter()
                found = store.vector_search(vector, depth, ef_search=ef)[:k]
                seconds.append(time.perf_counter() - started)
                hits[half] += found_of_exact(found, expected)
                total[half] += len(expected)
            p50, p95 = percentiles(seconds)
            halves = [half for half in (False, True) if total[half]]
            measured[ef] = EffortPoint(ef_search=ef, recall=sum(hits.values()) / max(sum(total.values()), 1),
                                       lower_bound=min(wilson_lower_bound(hits[h], total[h]) for h in halves),
                                       p50_ms=p50, p95_ms=p95)
            log.info("ef_search %d: Recall@%d %.4f (>= %.4f at 95%%), p50 %.2f ms", ef, k, measured[ef].recall,
                     measured[ef].lower_bound, p50)
        return measured[ef]

    def reaches(ef: int) -> bool:
        return measure(ef).lower_bound >= target_recall

    # low: the widest effort known to miss the target, or depth - 1. Both stores search at least as wide as
    # the results asked for (max(ef_search, depth)), so an effort under the depth measures as the depth and
    # the bisection would choose it (down to 1), which a shallower query then runs as itself: none is tried.
    low, ef = depth - 1, max(FIRST_EF_SEARCH, depth)
    while not reaches(ef) and ef < max_ef:
        low, ef = ef, min(2 * ef, max_ef)
    chosen: int | None = ef if reaches(ef) else None
    if chosen is not None:
        while chosen - low > max(1, low // 16):
            middle = (low + chosen) // 2
            if reaches(middle):
                chosen = middle
            else:
                low = middle
    curve = tuple(measured[e] for e in sorted(measured))
    common = dict(target_recall=target_recall, k=k, depth=depth, queries=len(vectors), documents=sampled.documents,
                  calibrated_at=time.time(), curve=curve)
    if chosen is None:
        exact_p50, exact_p95 = percentiles(exact_s)
        best = max(curve, key=lambda p: (p.lower_bound, p.recall))
        reason = (f"no ef_search up to {max_ef} reached it at 95 % confidence (best: {best.recall:.4f} at "
                  f"{best.ef_search}, at least {best.lower_bound:.4f})")
        if best.recall >= target_recall:  # measured at or over the target, yet not shown: the sample is too small
            reason += (f"; {len(vectors)} sampled vectors are too few to show {target_recall:g}: sample more "
                       f"(--queries, SIDECAR_CALIBRATION_QUERIES)" if len(vectors) < sampled.documents else
                       f"; the store's {sampled.documents} documents are too few to show {target_recall:g}")
        return SearchEffort(ef_search=None, recall=1.0, p50_ms=exact_p50, p95_ms=exact_p95, exact_p50_ms=exact_p50,
                            exact_p95_ms=exact_p95, reason=reason, **common)
    # The cost, measured side by side (query by query, ANN then exact) so that a busy machine's
    # drift between the phases above cannot decide between the two.
    ann_s, exact_s = [], []
    for vector in tqdm(vectors, desc=f"timing ef_search {chosen} against exact search", unit="query",
                       disable=not progress):
        for seconds, options in ((ann_s, {"ef_search": chosen}), (exact_s, {"exact": True})):
            started = time.perf_counter()
            store.vector_search(vector, depth, **options)
            seconds.append(time.perf_counter() - started)
    (ann_p50, ann_p95), (exact_p50, exact_p95) = percentiles(ann_s), percentiles(exact_s)
    common.update(exact_p50_ms=exact_p50, exact_p95_ms=exact_p95)
    if allow_exact and exact_p50 <= ann_p50:
        return SearchEffort(ef_search=None, recall=1.0, p50_ms=exact_p50, p95_ms=exact_p95,
                            reason=f"exact search is as fast as ef_search {chosen}, the lowest effort that reaches "
                                   f"it ({exact_p50:.2f} vs {ann_p50:.2f} ms p50)", **common)
    return SearchEffort(ef_search=chosen, recall=measured[chosen].recall, p50_ms=ann_p50, p95_ms=ann_p95,
                        reason=f"the lowest ef_search whose recall reaches it at 95 % confidence; "
                               f"{exact_p50 / ann_p50:.1f}x faster than exact search at p50", **common)


def recalibrate_if_changed(store: Store, *, changed: int, depth: int = Settings.rerank_candidates, queries: int = 300,
                           progress: bool = False) -> tuple[SearchEffort | None, str]:
    """After a load that wrote or deleted `changed` documents: calibrate again (and save) `depth` deep
    when the store has a recall target and no calibration for it at that depth, or when the load changed
    at least RECALIBRATE_FRACTION of the documents the calibration saw. Returns (the new effort or None,
    what was decided and why)."""
    policy = store.effort
    if not policy.target_recall:
        return None, "no target_recall: nothing to calibrate"
    saved = policy.applied()
    count = store.count()
    if count == 0:
        return None, "the store is empty: nothing to calibrate"
    depth = max(depth, policy.k)
    if saved is None:
        why = f"no calibration for Recall@{policy.k} {policy.target_recall:g} yet"
    elif saved.depth != depth:
        why = f"the calibration measured searches {saved.depth} deep; searches ask for {depth} candidates"
    elif changed >= RECALIBRATE_FRACTION * saved.documents or \
            abs(count - saved.documents) >= RECALIBRATE_FRACTION * saved.documents:
        why = (f"{changed} documents written or deleted; the calibration saw {saved.documents}, the store now "
               f"holds {count}")
    else:
        return None, (f"kept ef_search {saved.ef_search or 'exact'}: {changed} documents changed, under "
                      f"{RECALIBRATE_FRACTION:.0%} of the {saved.documents} calibrated")
    effort = calibrate(store, target_recall=policy.target_recall, k=policy.k, depth=depth, queries=queries,
                       progress=progress)
    policy.save(effort)
    return effort, f"calibrated ({why})"


