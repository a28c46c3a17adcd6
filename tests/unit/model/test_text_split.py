"""Splitting a batch of mixed text lengths: the least-cost grouping, the cost line, and the encoder's
vectors unchanged by the split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.model.text_split import ForwardCost, width_groups
from tests.unit.model.test_encoder_text import _widths_seen_by


def _cost(widths: np.ndarray, groups: list[np.ndarray], fixed: float) -> float:
    return sum(fixed + len(rows) * int(widths[rows].max()) for rows in groups)


def _least_cost_by_trying_every_split(widths: np.ndarray, fixed: float) -> float:
    ordered = np.sort(widths)
    best = float("inf")
    for cuts in itertools.product((False, True), repeat=len(ordered) - 1):
        starts = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(ordered)]
        best = min(best, sum(fixed + (b - a) * int(ordered[b - 1]) for a, b in zip(starts, starts[1:])))
    return best


@settings(max_examples=300, deadline=None)
@given(widths=st.lists(st.integers(1, 77), min_size=1, max_size=9),
       fixed=st.floats(0.5, 300, allow_nan=False))
def test_width_groups_cover_every_row_once_at_the_least_modelled_cost(widths, fixed):
    widths = np.asarray(widths)
    groups = width_groups(widths, fixed)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(widths)))
    assert _cost(widths, groups, fixed) == pytest.approx(_least_cost_by_trying_every_split(widths, fixed))


def test_one_long_text_among_short_queries_gets_a_forward_of_its_own():
    widths = np.asarray([5, 6, 77, 5, 4, 6, 5, 5])
    groups = width_groups(widths, fixed_token_rows=46)  # ViT-B-32's fixed part on the 2-core box
    assert [sorted(rows.tolist()) for rows in groups] == [[0, 1, 3, 4, 5, 6, 7], [2]]


def test_a_batch_whose_padding_is_cheaper_than_a_forward_stays_whole():
    widths = np.asarray([5, 6, 77, 5])  # 215 padded tokens
    assert len(width_groups(widths, fixed_token_rows=216)) == 1
    assert len(width_groups(widths, fixed_token_rows=100)) == 2
    assert len(width_groups(np.asarray([9] * 64), fixed_token_rows=0.5)) == 1


def test_the_cost_line_goes_through_both_timings():
    cost = ForwardCost.fit((1, 8, 30.0), (3, 77, 140.0))
    assert cost.fixed_ms + cost.per_token_row_ms * 8 == pytest.approx(30.0)
    assert cost.fixed_ms + cost.per_token_row_ms * 3 * 77 == pytest.approx(140.0)
    assert cost.fixed_token_rows == pytest.approx(cost.fixed_ms / cost.per_token_row_ms)


@pytest.mark.parametrize(("narrow_ms", "wide_ms"), [(30.0, 30.0), (30.0, 25.0), (0.1, 31.0)],
                         ids=["wide-as-fast", "wide-faster", "no-fixed-part"])
def test_timings_without_a_fixed_and_a_per_token_part_give_no_cost(narrow_ms, wide_ms):
    # no-fixed-part: 0.14 ms a token row from the two, so the 8-token forward "should" take 1.1 ms
    # before any fixed cost, not 0.1: the line crosses zero below one token.
    assert ForwardCost.fit((1, 8, narrow_ms), (3, 77, wide_ms)) is None


def test_a_measured_encoder_splits_a_mixed_batch_and_returns_the_whole_batchs_vectors(encoder, monkeypatch):
    texts = ["red", "blue square " * 40, "a red circle", "", "green"]  # the second fills the context
    tokens = encoder.prepare_texts(texts).tokens
    with torch.inference_mode():
        whole = encoder.model.encode_text(tokens)
    monkeypatch.setattr(encoder.text_tower, "cost", ForwardCost(fixed_ms=10.0, per_token_row_ms=1.0))
    with _widths_seen_by(encoder.model.transformer) as widths:
        torch.testing.assert_close(encoder.forward_texts(tokens), whole)
    short_width = int(tokens[[0, 2, 3, 4]].argmax(dim=-1).max()) + 1
    assert widths == [short_width, encoder.context_length]


def test_measuring_the_text_forward_times_a_short_text_alone_and_texts_filling_the_context(encoder, monkeypatch):
    monkeypatch.setattr(encoder.text_tower, "cost", None)  # restored after: the encoder is shared
    with _widths_seen_by(encoder.model.transformer) as widths:
        encoder.text_tower.measure_cost()
    narrow = widths[0]
    assert narrow < encoder.context_length
    assert widths == [narrow] * 4 + [encoder.context_length] * 4
