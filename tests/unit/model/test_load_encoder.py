"""load_encoder: what names the weights of the model it loads."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

import sidecar
from sidecar.config import Settings
from sidecar.model import weights
from sidecar.model.encoder import configured_weights_id, load_encoder, weights_id
from sidecar.model.tiny_model import checkpoint_path

TINY_CONFIG = Path(sidecar.__file__).parent / "model" / "model_configs" / "tiny-clip.json"


def random_weights_settings(tmp_path: Path) -> Settings:
    """An architecture outside the tiny models' recipes (no checkpoint), with no `pretrained`."""
    config = tmp_path / "tiny-random.json"
    shutil.copy(TINY_CONFIG, config)
    return Settings(model="tiny-random", model_config=str(config), pretrained="", device="cpu",
                    cache_dir=tmp_path / "cache")


def test_random_weights_come_from_one_seed_whatever_the_process_drew_before(tmp_path):
    # Each gunicorn worker loads its own model, and the text-vector cache file and the store key
    # vectors by the weights' name: "random" must name one model, whatever the process drew before.
    settings = random_weights_settings(tmp_path)
    first = load_encoder(settings, fetch=False)
    torch.rand(1000)  # another draw from the global generator in between, as a worker's start-up makes
    second = load_encoder(settings, fetch=False)
    assert first.weights == second.weights == "random"
    texts = ["a red circle", "two blue squares"]
    np.testing.assert_array_equal(first.encode_texts(texts), second.encode_texts(texts))


def test_a_model_without_pretrained_is_said_once_to_run_random_weights_naming_the_flag_not_in_open_clips_line(
        tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(weights, "_TOLD_RANDOM", set())  # a fresh process
    settings = random_weights_settings(tmp_path)
    with caplog.at_level(logging.WARNING):
        load_encoder(settings, fetch=False)
        load_encoder(settings, fetch=False)  # a second load in the process (serve --dev, a benchmark) adds nothing
    said = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(said) == 1, said  # open_clip's own root-logger line ("… initialized randomly") is not among them
    assert said[0].startswith('tiny-random runs with random weights (weights "random"): no --pretrained / '
                              'SIDECAR_PRETRAINED was given'), said


def test_a_tiny_model_trained_into_the_cache_is_not_said_to_run_random_weights(model_settings, caplog, monkeypatch):
    monkeypatch.setattr(weights, "_TOLD_RANDOM", set())
    with caplog.at_level(logging.WARNING):
        encoder = load_encoder(model_settings, fetch=False)
    assert encoder.weights.startswith("sha256:")
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_configured_weights_id_is_the_weights_load_encoder_gives_without_loading(encoder, fine_encoder, model_settings):
    # What `cache stats` / `cache prune` key the server's text vectors by: the tiny model's trained checkpoint
    # (by hash), a checkpoint file given as pretrained (the same hash), a tag as written, else "random".
    tiny = checkpoint_path(model_settings.cache_dir)
    assert configured_weights_id(model_settings) == encoder.weights == weights_id(str(tiny))
    large = dataclasses.replace(model_settings, model=fine_encoder.name)
    assert configured_weights_id(large) == fine_encoder.weights
    assert configured_weights_id(dataclasses.replace(model_settings, pretrained=str(tiny))) == encoder.weights
    assert configured_weights_id(dataclasses.replace(model_settings, model="ViT-B-32", pretrained="openai")) == "openai"
    assert configured_weights_id(dataclasses.replace(model_settings, model="ViT-B-32")) == "random"
