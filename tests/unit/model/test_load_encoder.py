"""load_encoder: what names the weights of the model it loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

import sidecar
from sidecar.config import Settings
from sidecar.model.encoder import load_encoder

TINY_CONFIG = Path(sidecar.__file__).parent / "model" / "model_configs" / "tiny-clip.json"


def test_random_weights_come_from_one_seed_whatever_the_process_drew_before(tmp_path):
    # Each gunicorn worker loads its own model, and the text-vector cache file and the store key
    # vectors by the weights' name: "random" must name one model, whatever the process drew before.
    config = tmp_path / "tiny-random.json"
    shutil.copy(TINY_CONFIG, config)  # an architecture outside the tiny models' recipes: no checkpoint
    settings = Settings(model="tiny-random", model_config=str(config), pretrained="", device="cpu",
                        cache_dir=tmp_path / "cache")
    first = load_encoder(settings, fetch=False)
    torch.rand(1000)  # another draw from the global generator in between, as a worker's start-up makes
    second = load_encoder(settings, fetch=False)
    assert first.weights == second.weights == "random"
    texts = ["a red circle", "two blue squares"]
    np.testing.assert_array_equal(first.encode_texts(texts), second.encode_texts(texts))
