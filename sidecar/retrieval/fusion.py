"""Score normalisation and fusion of ranked lists: min-max (with bounds), z-score, RRF."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

FUSION_METHODS = ("minmax", "zscore", "rrf")
RRF_K = 60  # the constant from Cormack et al.; OpenSearch's score-ranker uses the same default


def minmax(scores: Mapping[str, float], *, bounds: tuple[float, float] | None = None) -> dict[str, float]:
    """Scale to [0, 1]. Fixed `bounds` keep a lone weak hit from being stretched to 1."""
    if not scores:
        return {}
    low, high = bounds if bounds is not None else (min(scores.values()), max(scores.values()))
    if high <= low:
        return {key: 1.0 for key in scores}
    return {key: min(1.0, max(0.0, (value - low) / (high - low))) for key, value in scores.items()}


def zscore(scores: Mapping[str, float]) -> dict[str, float]:
    """Centre on the mean and scale by the standard deviation; a list of equal scores is 0 throughout."""
    if not scores:
        return {}
    # Equal scores (BM25 of identical captions) are compared as such, not through their std: their mean
    # rounds off the value (100 x 2.0599723 sums to 205.99723000000003), which leaves a std of rounding
    # noise that scaled every hit to +1 or -1 by the float value alone (one store's float32 BM25, another's).
    if max(scores.values()) == min(scores.values()):
        return {key: 0.0 for key in scores}
    mean = sum(scores.values()) / len(scores)
    std = math.sqrt(sum((v - mean) ** 2 for v in scores.values()) / len(scores))
    return {key: (value - mean) / std for key, value in scores.items()}


def rrf(rankings: Sequence[Sequence[str]], *, weights: Sequence[float], k: int = RRF_K) -> dict[str, float]:
    """Reciprocal rank fusion: sum of weight / (k + rank), rank counted from 1."""
    fused: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    return fused


def ranking(scores: Mapping[str, float]) -> list[str]:
    """Ids best first; equal scores keep the list's own order (a store's hits come in its ranking)."""
    return sorted(scores, key=scores.__getitem__, reverse=True)


def fused_ranking(fused: Mapping[str, float], score_lists: Sequence[Mapping[str, float]], *,
                  weights: Sequence[float]) -> list[str]:
    """`fused`'s ids best first. Equal fused scores go by rank in the more heavily weighted list (the first
    of equal weights), then in the others, then by id: so weights 0/1 (1/0) rank exactly as the BM25 (vector)
    list does, its own ties included, and its hits before the zero-weighted list's (which fuse to its floor)."""
    by_weight = sorted(zip(weights, score_lists, strict=True), key=lambda pair: -pair[0])
    ranks = [{key: rank for rank, key in enumerate(ranking(scores))} for _, scores in by_weight]
    absent = len(fused)
    return sorted(fused, key=lambda key: (-fused[key], *(rank.get(key, absent) for rank in ranks), key))


def fuse(
    score_lists: Sequence[Mapping[str, float]],
    *,
    method: str,
    weights: Sequence[float],
    bounds: Sequence[tuple[float, float] | None] | None = None,
) -> dict[str, float]:
    """Combine per-retriever scores into one score per id (missing from a list = contributes 0)."""
    if method not in FUSION_METHODS:
        raise ValueError(f"fusion {method!r}: choose one of {', '.join(FUSION_METHODS)}")
    if method == "rrf":
        rankings = [ranking(scores) for scores in score_lists]
        return rrf(rankings, weights=weights)
    bounds = bounds or [None] * len(score_lists)
    normalised = [minmax(s, bounds=b) if method == "minmax" else zscore(s)
                  for s, b in zip(score_lists, bounds, strict=True)]
    fused: dict[str, float] = {}
    for scores, weight in zip(normalised, weights, strict=True):
        for key, value in scores.items():
            fused[key] = fused.get(key, 0.0) + weight * value
    if method == "zscore":
        # A document missing from one list gets that list's floor, not 0 (0 is the mean there). A list without
        # spread (one hit, or hits that tie: BM25 on short templated texts) has z-scores of 0 only: its floor is
        # one below them, else its hits would count no more than the documents it lacks (a query's one BM25 match
        # ranked as though it had none).
        for scores, weight in zip(normalised, weights, strict=True):
            floor = min(scores.values(), default=0.0)
            if scores and floor == max(scores.values()):
                floor -= 1.0
            for key in fused.keys() - scores.keys():
                fused[key] += weight * floor
    return fused
