"""The encoding service's model-pass series: one observation per pass the model ran, of the items it ran."""

from __future__ import annotations

import dataclasses

from prometheus_client import REGISTRY

from sidecar.serving.encoding import EncodingService


def passes(modality: str) -> tuple[float, float, float]:
    """sidecar_batch_size's count and sum, and the forward stage's count, of the coarse model's `modality`."""
    labels = {"modality": modality, "model": "coarse"}
    return (REGISTRY.get_sample_value("sidecar_batch_size_count", labels) or 0.0,
            REGISTRY.get_sample_value("sidecar_batch_size_sum", labels) or 0.0,
            REGISTRY.get_sample_value("sidecar_stage_seconds_count", {**labels, "stage": "forward"}) or 0.0)


def added(before: tuple[float, ...], after: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(b - a for a, b in zip(before, after))


def test_texts_found_in_the_cache_file_are_no_forward_pass(model_settings, encoder, tmp_path):
    """The batcher's batch is looked up in the file first: texts found there never reach the model, and were
    counted as a pass of the model all the same (a server after `cache warm` reported passes it never ran)."""
    settings = dataclasses.replace(model_settings, text_cache_path=str(tmp_path / "text-vectors.sqlite"))
    first = EncodingService(encoder, settings)
    try:
        first.encode_texts(["a red circle", "a blue square"])
    finally:
        first.close()  # its vectors committed to the file
    again = EncodingService(encoder, settings)  # a restarted worker: nothing in memory
    try:
        before = passes("text")
        again.encode_texts(["a red circle", "a blue square"])
        assert added(before, passes("text")) == (0, 0, 0)
        before = passes("text")
        again.encode_texts(["a red circle", "a green triangle"])
        assert added(before, passes("text")) == (1, 1, 1)  # the one text the model encoded
    finally:
        again.close()


def test_a_request_over_max_batch_counts_each_pass_of_at_most_max_batch_items(model_settings, encoder):
    settings = dataclasses.replace(model_settings, text_cache_persist=False, max_batch=4)
    service = EncodingService(encoder, settings)
    try:
        before = passes("text")
        service.encode_texts([f"text number {i}" for i in range(10)])
        assert added(before, passes("text")) == (3, 10, 3)  # 4 + 4 + 2, where it read one pass of 10
    finally:
        service.close()
