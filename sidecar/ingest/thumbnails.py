"""Thumbnails for the search page: small JPEGs made at `embed` time, kept in the shards, loaded into
the store by `index` and served by document id only (never by a path on disk).

Decoding goes through `sidecar.model.images` (its limits and its format list), at a JPEG draft
scale near the thumbnail's size, so a large photo costs a fraction of a full decode. Where the
embed job has already decoded the image for the model, at a scale that covers the thumbnail, the
thumbnail is made from that decode instead of a second one.
"""

from __future__ import annotations

import io

from PIL import Image

from sidecar.model.images import ImageDecodeError, decode_image

# What the thumbnail endpoint answers with: every thumbnail is a baseline JPEG.
MEDIA_TYPE = "image/jpeg"
FORMAT = "JPEG"
QUALITY = 80


def make_thumbnail(data: bytes, *, side: int, max_pixels: int) -> bytes:
    """Image file bytes → a JPEG no larger than side × side (never enlarged), or b"" when the bytes
    cannot be decoded (the embed job reports unusable images through the model's own decode)."""
    try:
        image = decode_image(data, max_pixels=max_pixels, draft_size=(side, side))
    except ImageDecodeError:
        return b""
    return thumbnail_of(image, side=side)


def covers(image: Image.Image, *, side: int) -> bool:
    """Whether an image decoded for another use (the model's pixels) is large enough to shrink into
    this thumbnail: at least as large as `make_thumbnail`'s own draft decode would make it."""
    return min(image.size) >= side


def thumbnail_of(image: Image.Image, *, side: int) -> bytes:
    """An upright RGB image → the thumbnail JPEG. Shrinks `image` in place.

    Bilinear (PIL's filter widens with the reduction, so it still averages every source pixel):
    at 128 px it looks like Lanczos and takes about half the time (bench/RESULTS.md)."""
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format=FORMAT, quality=QUALITY, optimize=True)
    return out.getvalue()
