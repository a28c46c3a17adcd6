"""Synthetic shapes: deterministic renders, captions that name their attributes, a readable corpus."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from sidecar.model import synthetic


def test_render_is_deterministic_by_seed():
    first = synthetic.sample_items(20, seed=3)
    again = synthetic.sample_items(20, seed=3)
    other = synthetic.sample_items(20, seed=4)
    assert [i.image.tobytes() for i in first] == [i.image.tobytes() for i in again]
    assert [i.attributes for i in first] == [i.attributes for i in again]
    assert [i.image.tobytes() for i in first] != [i.image.tobytes() for i in other]


def test_item_does_not_depend_on_how_many_are_asked_for():
    short, long = synthetic.sample_items(5, seed=1), synthetic.sample_items(50, seed=1)
    assert [i.image.tobytes() for i in short] == [i.image.tobytes() for i in long[:5]]
    assert [i.id for i in long] == [f"item-{k:06d}" for k in range(50)]


def test_render_size_and_mode():
    attrs = {"shape": "star", "color": "blue", "size": "small", "position": "top"}
    image = synthetic.render(attrs, size=48, rng=random.Random(0))
    assert image.mode == "RGB" and image.size == (48, 48)


def test_render_draws_the_named_colour_where_the_position_says():
    attrs = {"shape": "circle", "color": "red", "size": "large", "position": "left"}
    pixels = np.asarray(synthetic.render(attrs, size=64, rng=random.Random(0)), dtype=np.int32)
    red = np.array(synthetic.COLORS["red"])
    assert np.abs(pixels[32, 18] - red).max() <= 20  # centre of the left-hand circle
    assert np.abs(pixels[32, 60] - red).max() > 100  # the right edge is background


def test_render_rejects_unknown_attribute_naming_the_choices():
    with pytest.raises(ValueError, match="color='teal' is not one of: red, orange"):
        synthetic.render({"shape": "circle", "color": "teal", "size": "small", "position": "left"},
                         rng=random.Random(0))


def test_captions_name_the_attributes():
    attrs = {"shape": "circle", "color": "red", "size": "large", "position": "left"}
    assert synthetic.full_caption(attrs) == "a large red circle on the left"
    assert synthetic.describe(attrs) == "large red circle on the left"
    assert synthetic.compose_caption({"shape": "circle", "color": "red"}, template=1) == "red circle"
    assert synthetic.compose_caption({"color": "orange", "position": "top"}) == "an orange shape at the top"


def test_random_caption_names_exactly_its_subset():
    rng = random.Random(0)
    attrs = {"shape": "triangle", "color": "green", "size": "small", "position": "bottom"}
    seen_partial = False
    for _ in range(200):
        caption, subset = synthetic.random_caption(attrs, rng)
        assert subset and subset.items() <= attrs.items()
        words = caption.split()
        for name, value in attrs.items():
            assert (value in words) == (name in subset), (caption, subset)
        seen_partial |= len(subset) < len(attrs)
    assert seen_partial


def test_write_corpus_writes_real_jpegs_and_a_manifest(tmp_path):
    manifest = synthetic.write_corpus(tmp_path, 12, seed=5)
    lines = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 12
    assert len({line["id"] for line in lines}) == 12
    for line in lines:
        assert set(line) == {"id", "path", "text", "metadata"}
        assert set(line["metadata"]) == {"shape", "color", "size", "position"}
        assert line["text"] == synthetic.describe(line["metadata"])
        path = tmp_path / line["path"]
        assert not line["path"].startswith("/") and path.is_file()
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
            image.load()
    assert not list(tmp_path.glob(".*tmp"))
    # The metadata is the truth for the pixels: the same as sample_items gives.
    assert [line["metadata"] for line in lines] == [i.attributes for i in synthetic.sample_items(12, seed=5)]


def test_excluded_pairs_never_appear_in_the_stream():
    items = synthetic.iter_items(2000, seed=5, exclude=synthetic.HELD_OUT_PAIRS)
    assert not any(synthetic.is_held_out(item.attributes) for item in items)
    # Without the exclusion, the same stream does hold them (about one item in eight).
    assert any(synthetic.is_held_out(item.attributes) for item in synthetic.iter_items(200, seed=5))
