"""CUDA graphs for the text tower: one captured graph per batch-size bucket.

A ViT-B-32 text forward is ~200 small kernels; at the batch sizes online serving sees, launching
them from Python costs more than running them. Replaying a captured graph launches them all
at once. Batches are padded up to the nearest captured size; larger ones run eagerly.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two up to `max_batch`, and `max_batch` itself: at most 2x padding per call."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch]
    return sorted({*sizes, max_batch})


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds `n` rows, or None when `n` is larger than all."""
    return next((size for size in sizes if size >= n), None)


class TextGraphs:
    """Captured text-tower graphs. Replays are serialised by a lock because the graphs share
    static input/output buffers; the output rows are cloned before the lock is released."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, context_length: int,
                 device: torch.device, sizes: Sequence[int]):
        self.sizes = sorted(sizes)
        self._lock = threading.Lock()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        # Largest first: smaller graphs then fit in the memory the largest one reserved.
        for size in reversed(self.sizes):
            tokens = torch.zeros((size, context_length), dtype=torch.long, device=device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up runs (cuBLAS handles, lazy init) before capture
                for _ in range(2):
                    forward(tokens)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                features = forward(tokens)
            self._graphs[size] = (graph, tokens, features)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features for `tokens` [n, context] (n <= the largest size): a fresh tensor on the device."""
        n = tokens.shape[0]
        size = bucket_for(n, self.sizes)
        if size is None:
            raise ValueError(f"batch of {n} is larger than the largest captured size {self.sizes[-1]}")
        graph, static_tokens, static_features = self._graphs[size]
        with self._lock:
            static_tokens[:n].copy_(tokens, non_blocking=True)
            static_tokens[n:].zero_()
            graph.replay()
            return static_features[:n].clone()
