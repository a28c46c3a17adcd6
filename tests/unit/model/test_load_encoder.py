"""load_encoder: what names the weights of the model it loads."""

from __future__ import annotations

import dataclasses
import json
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
from sidecar.serving.encoding import text_cache_namespaces

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
    assert first.weights == second.weights == weights.random_weights_id(settings)
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
    weights_named = weights.random_weights_id(settings)
    assert said[0].startswith(f'tiny-random runs with random weights (weights "{weights_named}"): no --pretrained / '
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


def test_random_weights_of_two_model_configs_under_one_name_have_two_weights_ids_and_cache_namespaces(tmp_path):
    # Both were "random": the text-vector cache served one architecture's vectors to the other, and a store
    # embedded with one took the other's queries.
    (tmp_path / "one").mkdir()
    one = random_weights_settings(tmp_path / "one")
    config = json.loads(TINY_CONFIG.read_text())
    config["text_cfg"]["layers"] = 1
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "tiny-random.json").write_text(json.dumps(config, indent=4))
    two = dataclasses.replace(one, model_config=str(tmp_path / "two" / "tiny-random.json"))
    first, second = load_encoder(one, fetch=False), load_encoder(two, fetch=False)
    assert first.weights.startswith("random:") and second.weights.startswith("random:")
    assert first.weights != second.weights
    assert first.signature != second.signature
    assert text_cache_namespaces(one) != text_cache_namespaces(two)
    assert configured_weights_id(one) == first.weights and configured_weights_id(two) == second.weights


def test_the_random_weights_id_of_a_model_config_ignores_its_spacing_and_key_order(tmp_path):
    settings = random_weights_settings(tmp_path)
    before = configured_weights_id(settings)
    config = json.loads(TINY_CONFIG.read_text())
    Path(settings.model_config).write_text(json.dumps(dict(reversed(config.items()))))
    assert configured_weights_id(settings) == before


def test_one_checkpoint_file_in_two_model_configs_under_one_name_has_two_weights_ids_and_cache_namespaces(
        tmp_path, model_settings):
    # The weights id was the file's hash alone: after the config's text pooling changed under the same name and
    # file, the text-vector cache served the old architecture's vectors and a store embedded with it took the new
    # one's queries, though the two encode differently.
    checkpoint = str(checkpoint_path(model_settings.cache_dir))
    (tmp_path / "one").mkdir()
    one = dataclasses.replace(random_weights_settings(tmp_path / "one"), pretrained=checkpoint)
    config = json.loads(TINY_CONFIG.read_text())
    config["text_cfg"]["pool_type"] = "last"  # the end-of-text token's output, where it was the argmax token's
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "tiny-random.json").write_text(json.dumps(config, indent=4))
    two = dataclasses.replace(one, model_config=str(tmp_path / "two" / "tiny-random.json"))
    first, second = load_encoder(one, fetch=False), load_encoder(two, fetch=False)
    texts = ["a red circle"]
    assert not np.allclose(first.encode_texts(texts), second.encode_texts(texts), atol=1e-3)
    assert first.weights.startswith(weights_id(checkpoint)) and second.weights.startswith(weights_id(checkpoint))
    assert first.weights != second.weights and first.signature != second.signature
    assert text_cache_namespaces(one) != text_cache_namespaces(two)
    assert configured_weights_id(one) == first.weights and configured_weights_id(two) == second.weights
