"""Splitting a batch of texts of mixed lengths into forwards of similar width.

The text tower runs a batch at its longest text's width (`Encoder.forward_texts`), so one pasted
paragraph (77 tokens) in a batch of short queries makes every query pay for 77. A forward costs
about `fixed + per_token_row * rows * width`: the fixed part is reading the weights (and, on a GPU,
launching the kernels), the rest the arithmetic. Where the fixed part is small against the padding
a batch would carry, two or more forwards cost less than one; `width_groups` picks the split with
the least modelled cost, and `ForwardCost.measure` finds the two constants on the device at hand."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class ForwardCost:
    """A text forward's cost as `fixed_ms + per_token_row_ms * rows * width`."""

    fixed_ms: float
    per_token_row_ms: float

    @property
    def fixed_token_rows(self) -> float:
        """The fixed part in token rows: the padding one more forward must save to pay for itself."""
        return self.fixed_ms / self.per_token_row_ms

    @classmethod
    def fit(cls, narrow: tuple[int, int, float], wide: tuple[int, int, float]) -> ForwardCost | None:
        """The line through two timed forwards, each (rows, width, ms); None where the timings do not
        describe a fixed part plus a per-token part (noise: the wider forward was not slower, or the
        line crosses zero below one token), and splitting would be a guess."""
        (rows_a, width_a, ms_a), (rows_b, width_b, ms_b) = narrow, wide
        per_token_row = (ms_b - ms_a) / (rows_b * width_b - rows_a * width_a)
        fixed = ms_a - per_token_row * rows_a * width_a
        if per_token_row <= 0 or fixed <= 0:
            return None
        return cls(fixed_ms=fixed, per_token_row_ms=per_token_row)

    @classmethod
    def measure(cls, forward: Callable[[torch.Tensor], torch.Tensor], *, narrow: torch.Tensor, wide: torch.Tensor,
                synchronize: Callable[[], None], repeats: int = 3) -> ForwardCost | None:
        """Time `forward` on two token batches, each ending at its last column (a short text alone,
        a few texts that fill the context): the fastest of `repeats` runs each, after one to warm up.
        Then fit the line through them."""

        def timed(tokens: torch.Tensor) -> tuple[int, int, float]:
            best = float("inf")
            for attempt in range(repeats + 1):
                started = time.perf_counter()
                forward(tokens)
                synchronize()
                if attempt:
                    best = min(best, (time.perf_counter() - started) * 1000)
            return tokens.shape[0], tokens.shape[1], best

        return cls.fit(timed(narrow), timed(wide))


def width_groups(widths: np.ndarray, fixed_token_rows: float) -> list[np.ndarray]:
    """Rows (indices into `widths`, each row's width in tokens) grouped into forwards so that the
    modelled cost — `fixed_token_rows` per forward plus rows × the group's widest row — is least.
    One group, all rows, unless splitting saves more than it costs."""
    count = len(widths)
    # No split can save more than the batch's padding; most batches (queries alike) stop here.
    if not count or count * int(widths.max()) - int(widths.sum()) <= fixed_token_rows:
        return [np.arange(count)]
    order = np.argsort(widths, kind="stable")
    sorted_widths = widths[order]
    # Groups are runs of the sorted widths; best[j] is the least cost of the first j rows, cut[j]
    # where its last group starts.
    best = [0.0] * (count + 1)
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        width = int(sorted_widths[end - 1])
        best[end], cut[end] = min((best[start] + fixed_token_rows + (end - start) * width, start)
                                  for start in range(end))
    groups = []
    end = count
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]
