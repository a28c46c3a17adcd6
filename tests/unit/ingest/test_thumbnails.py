"""Thumbnails: the image shrunk to fit the size (never enlarged), as a JPEG; undecodable bytes make none."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sidecar.ingest.decode_pool import decode_data
from sidecar.ingest.thumbnails import make_thumbnail


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(("size", "expected"), [((1600, 800), (128, 64)), ((300, 900), (43, 128)), ((40, 30), (40, 30))],
                         ids=["wide", "tall", "small-kept-as-is"])
def test_a_thumbnail_fits_the_size_keeps_the_aspect_and_is_never_enlarged(size, expected):
    thumbnail = make_thumbnail(encoded(Image.new("RGB", size, (200, 30, 40)), "JPEG"), side=128, max_pixels=10**8)
    with Image.open(io.BytesIO(thumbnail)) as image:
        assert image.format == "JPEG" and image.size == expected
        np.testing.assert_allclose(np.asarray(image).reshape(-1, 3).mean(axis=0), (200, 30, 40), atol=4)


def test_transparency_becomes_white_and_any_allowed_format_is_read():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    thumbnail = make_thumbnail(encoded(rgba, "PNG"), side=32, max_pixels=10**6)
    with Image.open(io.BytesIO(thumbnail)) as image:
        assert image.size == (32, 32)
        assert np.asarray(image).min() > 245  # transparent → the white background, as the model sees it


@pytest.mark.parametrize("data", [b"not an image", encoded(Image.new("RGB", (100, 100)), "PNG")[:60]],
                         ids=["not-an-image", "truncated"])
def test_bytes_that_do_not_decode_make_no_thumbnail(data):
    assert make_thumbnail(data, side=64, max_pixels=10**6) == b""


def test_an_image_over_the_pixel_limit_makes_no_thumbnail():
    assert make_thumbnail(encoded(Image.new("RGB", (200, 200)), "PNG"), side=64, max_pixels=100 * 100) == b""


@pytest.mark.parametrize("side", [64, 256], ids=["from-the-models-decode", "from-its-own-decode"])
def test_the_embed_jobs_thumbnail_matches_one_made_from_the_file(encoder, side):
    # A 1600 x 800 photo: the tiny model's draft decode (1/8 scale, 200 x 100) covers a 64-px
    # thumbnail, which is made from it; a 256-px one needs a larger decode of its own.
    photo = Image.new("RGB", (1600, 800), (200, 30, 40))
    photo.paste((20, 120, 220), (0, 0, 800, 800))
    data = encoded(photo, "JPEG")
    pixels, thumbnail, reason = decode_data(encoder.images, data, max_pixels=10**8, thumbnail_side=side)
    assert reason is None and pixels.shape == (*encoder.images.spec.output_size, 3)
    with Image.open(io.BytesIO(thumbnail)) as ours, Image.open(io.BytesIO(make_thumbnail(data, side=side,
                                                                                        max_pixels=10**8))) as own:
        assert ours.size == own.size == (side, side // 2)
        np.testing.assert_allclose(np.asarray(ours, dtype=float), np.asarray(own, dtype=float), atol=40)
        np.testing.assert_allclose(np.asarray(ours, dtype=float).mean(axis=(0, 1)),
                                   np.asarray(own, dtype=float).mean(axis=(0, 1)), atol=3)
