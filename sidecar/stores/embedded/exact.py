"""Exact inner-product search over the store's memmapped vectors: the ground truth ANN is checked
against, the path for small filtered sets, and the rows the HNSW graph does not cover yet."""

from __future__ import annotations

import numpy as np

# 32k rows of 512-d float32 = 64 MiB per step: exact search over 1M rows stays bounded.
EXACT_CHUNK_ROWS = 32_768


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best; of the scores equal to the k-th, the lowest rows, as `_ranked` orders ties (argpartition
    keeps any of them): a search is then a prefix of a deeper one, and agrees with a full sort."""
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        above = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)
        keep = np.concatenate([above, tied[np.argsort(rows[tied], kind="stable")[:k - len(above)]]])
        scores, rows = scores[keep], rows[keep]
    return scores, rows


def _ranked(scores: np.ndarray, rows: np.ndarray) -> list[tuple[int, float]]:
    # Ties break by row number so exact results are deterministic.
    order = np.lexsort((rows, -scores))
    return [(int(rows[i]), float(scores[i])) for i in order if np.isfinite(scores[i])]


def exact_all(vectors: np.ndarray, live: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    for start in range(0, len(vectors), EXACT_CHUNK_ROWS):
        stop = min(start + EXACT_CHUNK_ROWS, len(vectors))
        scores = np.asarray(vectors[start:stop]) @ query
        scores[~live[start:stop]] = -np.inf
        scores, rows = _top_k(scores, np.arange(start, stop, dtype=np.int64), k)
        best_scores, best_rows = _top_k(np.concatenate([best_scores, scores]), np.concatenate([best_rows, rows]), k)
    return _ranked(best_scores, best_rows)


def exact_over_rows(vectors: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray) -> list[tuple[int, float]]:
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    for start in range(0, len(rows), EXACT_CHUNK_ROWS):
        batch = rows[start:start + EXACT_CHUNK_ROWS]
        scores, kept = _top_k(vectors[batch] @ query, batch, k)
        best_scores, best_rows = _top_k(np.concatenate([best_scores, scores]), np.concatenate([best_rows, kept]), k)
    return _ranked(best_scores, best_rows)


def merged(first: list[tuple[int, float]], second: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """Top k of two (row, score) lists over disjoint rows (the graph's rows and the exact tail)."""
    if not second:
        return first
    return sorted(first + second, key=lambda hit: (-hit[1], hit[0]))[:k]
