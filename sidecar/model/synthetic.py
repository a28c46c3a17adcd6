"""Synthetic image–caption data: coloured shapes rendered deterministically from a seed."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping

from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Named colours chosen to stay distinct after JPEG and a 32-px resize; all read well on the
# light backgrounds below (no white, no grey).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (245, 130, 10),
    "yellow": (235, 205, 15),
    "green": (30, 150, 45),
    "blue": (30, 70, 220),
    "purple": (125, 40, 170),
    "pink": (245, 105, 185),
    "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Attribute names in a fixed order: captions, metadata and the tiny model's loss all use it.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
}

# (colour, shape) pairs the tiny models never see in training (`sample_attributes(exclude=...)`):
# a query for a purple star is truly out of distribution, so the benchmark can show what a model
# does with a combination it has to compose from parts it learnt apart.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "star"), ("orange", "circle"), ("black", "triangle"), ("pink", "square"), ("blue", "cross"),
)

# Shape radius as a fraction of the canvas side, and shape centre per position.
_RADIUS = {"small": (0.13, 0.17), "large": (0.25, 0.29)}
_CENTRE = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28),
           "bottom": (0.5, 0.72), "center": (0.5, 0.5)}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "center": ("in the center", "in the middle"),
}
JPEG_QUALITY = 90


@dataclass(frozen=True, slots=True)
class SyntheticItem:
    """One rendered image with its full caption and the attributes that produced it."""

    id: str
    image: Image.Image = field(repr=False)
    caption: str
    attributes: dict[str, str]


def sample_attributes(rng: random.Random, *, exclude: Collection[tuple[str, str]] = ()) -> dict[str, str]:
    """Draw one value per attribute, uniformly over the (colour, shape) pairs not in `exclude`."""
    while True:
        attrs = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
        if not is_held_out(attrs, exclude):
            return attrs


def is_held_out(attrs: Mapping[str, str], pairs: Collection[tuple[str, str]] = HELD_OUT_PAIRS) -> bool:
    """Whether the item's (colour, shape) pair is one of `pairs`."""
    return (attrs.get("color"), attrs.get("shape")) in pairs


def render(attrs: Mapping[str, str], *, size: int = 64, rng: random.Random) -> Image.Image:
    """Draw `attrs` as an RGB image of `size`×`size`; `rng` jitters background, colour, place and angle.

    Jitter keeps the images varied enough that a model must learn the attributes rather than
    memorise pixels; it never changes which attribute value a viewer would name.
    """
    _check_attributes(attrs)
    base = rng.randint(200, 248)
    background = tuple(min(255, base + rng.randint(-8, 8)) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)

    colour = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLORS[attrs["color"]])
    low, high = _RADIUS[attrs["size"]]
    radius = size * rng.uniform(low, high)
    cx, cy = _CENTRE[attrs["position"]]
    cx = size * (cx + rng.uniform(-0.04, 0.04))
    cy = size * (cy + rng.uniform(-0.04, 0.04))
    angle = rng.uniform(-0.2, 0.2)  # radians; small, so a square stays a square, not a diamond

    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=colour)
    return image


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        side = r * 0.85  # half-side: a square of the same visual weight as the circle
        points = [(-side, -side), (side, -side), (side, side), (-side, side)]
    elif shape == "triangle":
        points = [(r * math.cos(a), r * math.sin(a) + r * 0.15)
                  for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.42
            points.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        arm = r * 0.34
        points = [(-arm, -r), (arm, -r), (arm, -arm), (r, -arm), (r, arm), (arm, arm),
                  (arm, r), (-arm, r), (-arm, arm), (-r, arm), (-r, -arm), (-arm, -arm)]
    else:  # _check_attributes has run: unreachable unless SHAPES grows without a drawing
        raise ValueError(f"no drawing for shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _check_attributes(attrs: Mapping[str, str]) -> None:
    for name, values in ATTRIBUTES.items():
        value = attrs.get(name)
        if value not in values:
            raise ValueError(f"attribute {name}={value!r} is not one of: {', '.join(values)}")


def full_caption(attrs: Mapping[str, str]) -> str:
    """The canonical caption, e.g. "a large red circle on the left"."""
    return compose_caption(attrs, template=0, position_phrase=0)


def describe(attrs: Mapping[str, str]) -> str:
    """The title-like text stored for lexical (BM25) search, e.g. "large red circle on the left"."""
    return f"{attrs['size']} {attrs['color']} {attrs['shape']} {_POSITION_PHRASES[attrs['position']][0]}"


# Phrasings for training and for tests; {a} is the article, {adj} size and colour words,
# {noun} the shape (or "shape" when the caption leaves it out), {pos} the position phrase.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a} {adj}{noun}{pos}",
    "{adj}{noun}{pos}",
    "a photo of {a} {adj}{noun}{pos}",
    "an image of {a} {adj}{noun}{pos}",
    "there is {a} {adj}{noun}{pos}",
    "{a} {adj}{noun} drawn{pos}",
)


def compose_caption(attrs: Mapping[str, str], *, template: int = 0, position_phrase: int = 0) -> str:
    """Caption for any subset of the attributes (missing keys are simply not mentioned)."""
    adjectives = [attrs[k] for k in ("size", "color") if k in attrs]
    noun = attrs.get("shape", "shape")
    adj = "".join(f"{word} " for word in adjectives)
    first = (adjectives[0] if adjectives else noun)
    article = "an" if first[0] in "aeiou" else "a"
    pos = ""
    if "position" in attrs:
        phrases = _POSITION_PHRASES[attrs["position"]]
        pos = " " + phrases[position_phrase % len(phrases)]
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(a=article, adj=adj, noun=noun, pos=pos)


def random_caption(attrs: Mapping[str, str], rng: random.Random) -> tuple[str, dict[str, str]]:
    """A caption naming a random, non-empty subset of `attrs` in a random phrasing.

    Returns the caption and the subset it names: a query such as "red circle" is satisfied by
    every image whose colour is red and shape is circle, whatever its size and position.
    """
    keep = {"shape": 0.85, "color": 0.85, "size": 0.55, "position": 0.55}
    subset = {k: attrs[k] for k, p in keep.items() if rng.random() < p}
    if not subset:
        name = rng.choice(tuple(keep))
        subset = {name: attrs[name]}
    caption = compose_caption(subset, template=rng.randrange(len(CAPTION_TEMPLATES)),
                              position_phrase=rng.randrange(2))
    return caption, subset


def item_rng(seed: int, index: int) -> random.Random:
    """Each item has its own generator, so item i is the same whatever n is asked for."""
    return random.Random(f"sidecar.synthetic/{seed}/{index}")


def iter_items(n: int, *, seed: int, size: int = 64, start: int = 0,
               exclude: Collection[tuple[str, str]] = ()) -> Iterator[SyntheticItem]:
    """Items start..start+n-1 of the stream for `seed`, rendered lazily; none of an `exclude` pair."""
    for index in range(start, start + n):
        rng = item_rng(seed, index)
        attrs = sample_attributes(rng, exclude=exclude)
        yield SyntheticItem(id=f"item-{index:06d}", image=render(attrs, size=size, rng=rng),
                            caption=full_caption(attrs), attributes=attrs)


def sample_items(n: int, *, seed: int, size: int = 64) -> list[SyntheticItem]:
    """`n` rendered items, identical for identical (n, seed, size)."""
    return list(iter_items(n, seed=seed, size=size))


def jpeg_roundtrip(image: Image.Image, *, quality: int = JPEG_QUALITY) -> Image.Image:
    """What a reader of the written corpus decodes: the image after JPEG encoding."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded.convert("RGB")


def write_corpus(folder: Path | str, n: int, *, seed: int, size: int = 64, progress: bool = False) -> Path:
    """Write `n` items as `<id>.jpg` plus `manifest.jsonl`; returns the manifest path.

    Manifest lines: {"id", "path" (relative to folder), "text" (BM25 description), "metadata":
    {"shape", "color", "size", "position"}}.
    """
    entries = ((item.id, item.image, describe(item.attributes), item.attributes)
               for item in iter_items(n, seed=seed, size=size))
    return write_manifest_corpus(folder, entries, total=n, progress=progress)


def write_manifest_corpus(folder: Path | str, entries: Iterable[tuple[str, Image.Image, str, Mapping[str, Any]]],
                          *, total: int, progress: bool = False) -> Path:
    """Write (id, image, text, metadata) entries as `<id>.jpg` plus `manifest.jsonl`; returns its path.

    The manifest is written to a temporary name and renamed last, so a manifest present means
    every image it lists is complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    partial = folder / f".manifest.jsonl.{os.getpid()}.tmp"
    with partial.open("w", encoding="utf-8") as out:
        for doc_id, image, text, metadata in tqdm(entries, total=total, disable=not progress, desc="render",
                                                  unit="img"):
            name = f"{doc_id}.jpg"
            image.save(folder / name, format="JPEG", quality=JPEG_QUALITY)
            out.write(json.dumps({"id": doc_id, "path": name, "text": text, "metadata": dict(metadata)}) + "\n")
    os.replace(partial, manifest)
    log.info("wrote %d synthetic images and %s", total, manifest)
    return manifest
