"""The fine stage: the strong model's order wins where it disagrees with the fast one; lexical evidence fuses in."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.retrieval.fine import MissingFineVectors, fine_rank
from sidecar.types import Document


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


# The fast model ranks a > b > c for the query (1, 0); the strong model, in its own space, c > b > a.
DOCS = [Document(id="a", vector=unit(1, 0.1), fine_vector=unit(0.1, 1, 0)),
        Document(id="b", vector=unit(1, 0.5), fine_vector=unit(0.5, 1, 0)),
        Document(id="c", vector=unit(1, 0.9), fine_vector=unit(1, 0.1, 0))]
FINE_QUERY = unit(1, 0, 0)


def test_the_strong_models_order_replaces_the_fast_ones_where_they_disagree():
    scores = fine_rank(FINE_QUERY, DOCS)
    assert sorted(scores.final, key=scores.final.get, reverse=True) == ["c", "b", "a"]
    assert scores.final == scores.fine  # no lexical evidence: the strong model decides alone
    assert scores.fine["c"] == pytest.approx(float(unit(1, 0.1, 0) @ FINE_QUERY))


def test_lexical_evidence_fuses_with_the_strong_models_scores_by_the_weights():
    lexical = {"a": 12.0}  # only a matches the query's words
    heavy = fine_rank(FINE_QUERY, DOCS, lexical=lexical, weights=(0.3, 0.7))
    assert max(heavy.final, key=heavy.final.get) == "a"
    light = fine_rank(FINE_QUERY, DOCS, lexical=lexical, weights=(0.9, 0.1))
    assert max(light.final, key=light.final.get) == "c"


def test_candidates_without_fine_vectors_are_refused_with_the_fix():
    with pytest.raises(MissingFineVectors, match="1 of 2 candidates .*embed them with --fine-model"):
        fine_rank(FINE_QUERY, [DOCS[0], Document(id="x", vector=unit(1, 0))])


def test_a_fine_query_of_another_dimension_is_refused():
    with pytest.raises(ValueError, match="fine query vector has 2 dimensions, the stored fine vectors 3"):
        fine_rank(unit(1, 0), DOCS)
