"""The tiny CLIP: cache keying, locking and atomic writes, the loss, and a trained model that retrieves."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sidecar.model import synthetic, tiny_model

# A recipe that trains in seconds: enough to exercise the code path, not to learn anything.
QUICK = replace(tiny_model.DEFAULT_RECIPE, steps=3, batch_size=16, train_images=48, warmup_steps=1)


def test_cache_key_follows_seed_and_recipe():
    key = tiny_model.cache_key(seed=0)
    assert key == tiny_model.cache_key(seed=0)
    assert key != tiny_model.cache_key(seed=1)
    assert key != tiny_model.cache_key(seed=0, recipe=QUICK)
    assert tiny_model.checkpoint_path(Path("/c"), seed=0).name == f"tiny-clip-{key}.pt"
    # The stronger model has its own config, recipe and checkpoint; training data holds the same pairs out.
    large = tiny_model.checkpoint_path(Path("/c"), model=tiny_model.LARGE_MODEL_NAME)
    assert large.name.startswith("tiny-clip-large-") and large.name != f"tiny-clip-large-{key}.pt"
    assert tiny_model.RECIPES[tiny_model.LARGE_MODEL_NAME].held_out_pairs == synthetic.HELD_OUT_PAIRS
    with pytest.raises(ValueError, match="unknown tiny model 'tiny-clip-xl'; available: tiny-clip, tiny-clip-large"):
        tiny_model.cache_key(model="tiny-clip-xl")


def test_positives_are_the_images_a_partial_caption_describes():
    image_codes = torch.tensor([tiny_model._attribute_codes(a) for a in (
        {"shape": "circle", "color": "red", "size": "large", "position": "left"},
        {"shape": "circle", "color": "red", "size": "small", "position": "top"},
        {"shape": "square", "color": "red", "size": "small", "position": "top"},
    )])
    caption_codes = torch.tensor([tiny_model._attribute_codes(s) for s in (
        {"shape": "circle", "color": "red"}, {"size": "small"}, {"shape": "square", "position": "left"},
    )])
    assert tiny_model._positives(caption_codes, image_codes).tolist() == [
        [True, True, False], [False, True, True], [False, False, False]]


def test_loss_with_one_positive_per_row_is_clip_loss():
    from open_clip import ClipLoss

    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(10.0)
    ours = tiny_model.contrastive_loss(images, texts, scale, torch.eye(8, dtype=torch.bool))
    assert torch.allclose(ours, ClipLoss()(images, texts, scale), atol=1e-6)


def test_creating_the_untrained_model_logs_no_random_init_warning(caplog):
    # open_clip's "No pretrained weights loaded ... initialized randomly" is the plan here, not a fault to show.
    with caplog.at_level(logging.WARNING):
        tiny_model._create_untrained(tiny_model.MODEL_NAME, seed=0)
        logging.getLogger("sidecar.test").warning("still shown")
    assert [r.getMessage() for r in caplog.records] == ["still shown"]


@pytest.mark.slow
def test_ensure_trains_once_writes_atomically_and_reuses_the_cache(tmp_path, monkeypatch):
    path = tiny_model.ensure_tiny_model(tmp_path, recipe=QUICK, progress=False)
    assert path == tiny_model.checkpoint_path(tmp_path, recipe=QUICK) and path.is_file()
    info = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert info["recipe"]["steps"] == 3 and "recall@1" in info["heldout_metrics"]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    def no_training(**kwargs):
        raise AssertionError("trained again although the checkpoint is cached")

    monkeypatch.setattr(tiny_model, "train_tiny_model", no_training)
    assert tiny_model.ensure_tiny_model(tmp_path, recipe=QUICK) == path


def test_failed_training_leaves_no_checkpoint_and_releases_the_lock(tmp_path, monkeypatch):
    def crash(**kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(tiny_model, "train_tiny_model", crash)
    with pytest.raises(RuntimeError, match="killed"):
        tiny_model.ensure_tiny_model(tmp_path, recipe=QUICK)
    folder = tmp_path / "tiny-clip"
    assert not [p for p in folder.iterdir() if p.suffix != ".lock"]
    with tiny_model._exclusive_lock(tiny_model.checkpoint_path(tmp_path, recipe=QUICK).with_suffix(".lock")):
        pass  # would block forever if the failed run still held it


def test_a_waiting_caller_uses_the_checkpoint_the_lock_holder_wrote(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(tiny_model, "train_tiny_model", lambda **kw: trained.append(kw))
    path = tiny_model.checkpoint_path(tmp_path, recipe=QUICK)
    path.parent.mkdir(parents=True)
    result = {}
    with tiny_model._exclusive_lock(path.with_suffix(".lock")):  # "another process" is training
        waiter = threading.Thread(target=lambda: result.update(path=tiny_model.ensure_tiny_model(
            tmp_path, recipe=QUICK)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # blocked on the lock, not training alongside
        path.write_bytes(b"weights")
    waiter.join(timeout=10)
    assert result["path"] == path and trained == []


@pytest.fixture(scope="session")
def trained_checkpoint(model_settings) -> Path:
    # The test run's cache (tests/conftest.py): the model trains once per run, shared by every test.
    return tiny_model.ensure_tiny_model(model_settings.cache_dir, progress=False)


@pytest.mark.slow
def test_trained_model_loads_through_open_clip_and_retrieves_far_above_chance(trained_checkpoint):
    import open_clip

    # Exactly the users' path: register the config, create with a checkpoint path, get the tokenizer.
    open_clip.add_model_config(tiny_model.CONFIG_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(trained_checkpoint))
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    assert tokenizer.context_length == 32
    metrics = tiny_model.evaluate_tiny_model(model, tokenizer, preprocess, n=200)
    # Chance is 1/200 for exact-item recall@1; attribute-match chance is about 1/400 per image.
    assert metrics["recall@1"] >= 0.8, metrics
    assert metrics["recall@10"] >= 0.97, metrics
    assert metrics["exact_recall@1"] >= 0.4, metrics
    assert metrics["partial_recall@1"] >= 0.8, metrics


@pytest.mark.slow
def test_short_queries_find_matching_images_in_a_written_corpus(trained_checkpoint, tmp_path):
    model, tokenizer, preprocess = tiny_model.load_tiny_model(trained_checkpoint)
    manifest = synthetic.write_corpus(tmp_path, 300, seed=11)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    from PIL import Image

    pixels = torch.stack([preprocess(Image.open(tmp_path / row["path"]).convert("RGB")) for row in rows])
    queries = {
        "red circle": {"color": "red", "shape": "circle"},
        "green triangle": {"color": "green", "shape": "triangle"},
        "a large blue square on the left": {"size": "large", "color": "blue", "shape": "square",
                                            "position": "left"},
        "small yellow star": {"size": "small", "color": "yellow", "shape": "star"},
    }
    # One guaranteed match per query (unnamed attributes drawn at random), rendered and written
    # as JPEG like the rest: a 300-image corpus holds a given 4-attribute combination only ~50% of the time.
    rng = random.Random(0)
    for wanted in queries.values():
        attrs = {**synthetic.sample_attributes(rng), **wanted}
        image = synthetic.jpeg_roundtrip(synthetic.render(attrs, rng=rng))
        rows.append({"metadata": attrs})
        pixels = torch.cat([pixels, preprocess(image)[None]])
    with torch.inference_mode():
        images = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        texts = torch.nn.functional.normalize(model.encode_text(tokenizer(list(queries))), dim=-1)
    top = (texts @ images.T).topk(3, dim=1).indices
    for (query, wanted), hits in zip(queries.items(), top.tolist()):
        best = rows[hits[0]]["metadata"]
        assert wanted.items() <= best.items(), (query, best)
