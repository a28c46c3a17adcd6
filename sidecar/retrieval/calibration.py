"""Calibrate a store's search effort for a recall target, on a sample of its own vectors.

Each sampled stored vector queries the store exactly (the truth) and by HNSW at growing efSearch;
Recall@K is the share of the exact top K (the query's own document left out of both lists: a
stored vector always finds itself, which would flatter every effort by 1/K) that the ANN top K
holds. The effort chosen is the lowest efSearch whose recall reaches the target with 95 %
confidence (the lower end of a one-sided Wilson interval, so a sample that happens to be easy
does not pick an effort that misses the target on the next queries), found by doubling and then
bisecting to within 1/16; exact search where it is faster than that effort, or where no efSearch
up to MAX_EF_SEARCH reaches the target. The store saves the result (`sidecar.stores.effort`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Sequence

from tqdm import tqdm

from sidecar.retrieval.evaluation import percentiles
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


def calibrate(store: Store, *, target_recall: float, k: int = 10, queries: int = 300, seed: int = 0,
              max_ef: int = MAX_EF_SEARCH, progress: bool = False) -> SearchEffort:
    """Measure the lowest effort that reaches `target_recall` (Recall@`k` against exact search) on
    `queries` stored vectors, and return it (the caller saves it: `store.effort.save`)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    ids = sorted(store.content_hashes())
    if not ids:
        raise ValueError("the store is empty: index something before calibrating")
    sample = random.Random(seed).sample(ids, min(queries, len(ids)))
    documents = store.fetch(sample)
    depth = k + 1  # the query's own document comes back too, and is left out
    truth: list[list[str]] = []
    exact_s: list[float] = []
    for doc in tqdm(documents, desc="exact search (the truth)", unit="query", disable=not progress):
        started = time.perf_counter()
        hits = store.vector_search(doc.vector, depth, exact=True)
        exact_s.append(time.perf_counter() - started)
        truth.append(_others(doc.id, hits, k))
    exact_p50, exact_p95 = percentiles(exact_s)

    measured: dict[int, EffortPoint] = {}

    def measure(ef: int) -> EffortPoint:
        if ef not in measured:
            hits = total = 0
            seconds = []
            for doc, expected in zip(documents, truth):
                started = time.perf_counter()
                found = store.vector_search(doc.vector, depth, ef_search=ef)
                seconds.append(time.perf_counter() - started)
                hits += len(set(_others(doc.id, found, k)) & set(expected))
                total += len(expected)
            p50, p95 = percentiles(seconds)
            measured[ef] = EffortPoint(ef_search=ef, recall=hits / max(total, 1),
                                       lower_bound=wilson_lower_bound(hits, total), p50_ms=p50, p95_ms=p95)
            log.info("ef_search %d: Recall@%d %.4f (>= %.4f at 95%%), p50 %.2f ms", ef, k, measured[ef].recall,
                     measured[ef].lower_bound, p50)
        return measured[ef]

    def reaches(ef: int) -> bool:
        return measure(ef).lower_bound >= target_recall

    low, ef = 0, max(FIRST_EF_SEARCH, depth)  # low: the widest effort known to miss the target
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
    common = dict(target_recall=target_recall, k=k, exact_p50_ms=exact_p50, exact_p95_ms=exact_p95,
                  queries=len(documents), documents=len(ids), calibrated_at=time.time(), curve=curve)
    if chosen is None:
        best = max(curve, key=lambda p: p.recall)
        return SearchEffort(ef_search=None, recall=1.0, p50_ms=exact_p50, p95_ms=exact_p95,
                            reason=f"no ef_search up to {max_ef} reached it (best: {best.recall:.4f} at "
                                   f"{best.ef_search}): exact search", **common)
    point = measured[chosen]
    if exact_p50 <= point.p50_ms:
        return SearchEffort(ef_search=None, recall=1.0, p50_ms=exact_p50, p95_ms=exact_p95,
                            reason=f"exact search is as fast as ef_search {chosen}, the lowest effort that reaches "
                                   f"it ({exact_p50:.2f} vs {point.p50_ms:.2f} ms p50)", **common)
    return SearchEffort(ef_search=chosen, recall=point.recall, p50_ms=point.p50_ms, p95_ms=point.p95_ms,
                        reason=f"the lowest ef_search whose recall reaches it at 95 % confidence, "
                               f"{exact_p50 / point.p50_ms:.1f}x faster than exact search", **common)


def recalibrate_if_changed(store: Store, *, changed: int, queries: int = 300,
                           progress: bool = False) -> tuple[SearchEffort | None, str]:
    """After a load that wrote or deleted `changed` documents: calibrate again (and save) when the
    store has a recall target and no calibration for it, or when the load changed at least
    RECALIBRATE_FRACTION of the documents the calibration saw. Returns (the new effort or None,
    what was decided and why)."""
    policy = store.effort
    if not policy.target_recall:
        return None, "no target_recall: nothing to calibrate"
    saved = policy.applied()
    count = store.count()
    if count == 0:
        return None, "the store is empty: nothing to calibrate"
    if saved is None:
        why = f"no calibration for Recall@{policy.k} {policy.target_recall:g} yet"
    elif changed >= RECALIBRATE_FRACTION * saved.documents or \
            abs(count - saved.documents) >= RECALIBRATE_FRACTION * saved.documents:
        why = (f"{changed} documents written or deleted; the calibration saw {saved.documents}, the store now "
               f"holds {count}")
    else:
        return None, (f"kept ef_search {saved.ef_search or 'exact'}: {changed} documents changed, under "
                      f"{RECALIBRATE_FRACTION:.0%} of the {saved.documents} calibrated")
    effort = calibrate(store, target_recall=policy.target_recall, k=policy.k, queries=queries, progress=progress)
    policy.save(effort)
    return effort, f"calibrated ({why})"


def _others(own_id: str, hits: Sequence, k: int) -> list[str]:
    return [hit.id for hit in hits if hit.id != own_id][:k]
