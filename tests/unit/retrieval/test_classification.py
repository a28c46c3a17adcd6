"""Prompt-set accuracy on a labelled sample: a sample label the set lacks is refused, naming the set's labels."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.model.prompts import Label, PromptSet
from sidecar.retrieval.classification import prompt_set_accuracy
from sidecar.retrieval.relevance import EvaluationInputError


def labelled(names: list[str]) -> PromptSet:
    return PromptSet(name="colors", version="1", labels=tuple(Label(name, ("{}",)) for name in names))


@pytest.mark.parametrize("count, listed", [(3, "(red, green, blue)"), (12, "(l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, …)")])
def test_a_sample_label_the_set_lacks_names_the_sets_labels_with_an_ellipsis_only_when_some_are_not_shown(count,
                                                                                                           listed):
    names = ["red", "green", "blue"] if count == 3 else [f"l{i}" for i in range(count)]
    vectors = np.eye(count, dtype=np.float32)
    with pytest.raises(EvaluationInputError) as refused:
        prompt_set_accuracy(labelled(names), vectors, vectors[:1], ["circle"], logit_scale=100.0)
    assert str(refused.value).endswith(f"are not labels of prompt set 'colors' {listed}")
