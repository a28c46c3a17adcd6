"""The relevance benchmark's data: a synthetic product catalogue where text and pixels carry different facts.

Each product is a rendered shape (`synthetic.render`: colour, shape, size, position) with a
title that carries what pixels cannot (brand, material, product code) and omits most of what
the picture shows: the shape is named in some titles, the colour in fewer (and now and then
wrongly), the size rarely, the position never; some brand names are misspelt. Queries come in
three kinds:

- text-heavy: a product code, or brand + material + shape ("Halcyon wool star"): lexical facts
  the image cannot show;
- image-heavy: three or four visual attributes in caption words ("a large red star on the
  left"): facts the title mostly omits;
- mixed: lexical and visual facts together ("Halcyon red star", "large red wool star").

A quarter of the image-heavy and mixed queries name a (colour, shape) pair the tiny models never
saw in training (`synthetic.HELD_OUT_PAIRS`): they are out of distribution, and marked so.
Judgments are graded from the attributes: 2 = the product has every attribute the query names,
1 = all but one (for queries that name three or more), unlisted = not relevant.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from PIL import Image

from sidecar.model import synthetic

log = logging.getLogger(__name__)

BRANDS: tuple[str, ...] = ("Acme", "Borealis", "Corvid", "Dunmore", "Everly", "Fenwick", "Galloway", "Halcyon",
                           "Ironwood", "Juniper")
MATERIALS: tuple[str, ...] = ("cotton", "leather", "wool", "steel", "ceramic", "bamboo")
# Product nouns: every title has one; no query asks for them, so they only add lexical noise.
NOUNS: tuple[str, ...] = ("patch", "badge", "sticker", "pin", "magnet")
VISUAL = tuple(synthetic.ATTRIBUTES)  # shape, color, size, position: what the pixels show
LEXICAL = ("brand", "material", "code")  # what only the title can say
CATEGORIES = ("text-heavy", "image-heavy", "mixed")

# How often a title names each visual fact, and how noisy it is.
P_TITLE_SHAPE = 0.7
P_TITLE_COLOR = 0.35
P_TITLE_SIZE = 0.15
P_WRONG_COLOR = 0.15  # of the titles that name a colour
P_BRAND_TYPO = 0.05
# Share of image-heavy and mixed queries aimed at a held-out (colour, shape) pair.
P_OUT_OF_DISTRIBUTION = 0.25


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    title: str
    attributes: dict[str, str]  # visual and lexical truth: shape, color, size, position, brand, material, code
    image: Image.Image = field(repr=False)


@dataclass(frozen=True, slots=True)
class BenchmarkQuery:
    id: str
    text: str
    category: str  # one of CATEGORIES
    named: dict[str, str]  # the attributes the query asks for
    out_of_distribution: bool

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "category": self.category,
                "tags": ["out-of-distribution"] if self.out_of_distribution else [], "named": self.named}


def product_code(seed: int, index: int, rng: random.Random) -> str:
    """Unique per index (7919 is prime to 90,000): two letters, a dash and five digits, e.g. QX-48213."""
    letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2))
    return f"{letters}-{(index * 7919 + seed * 104_729) % 90_000 + 10_000}"


def iter_products(n: int, *, seed: int, size: int = 64) -> Iterator[Product]:
    """Products 0..n-1 of the catalogue for `seed`; product i is the same whatever n is."""
    for index in range(n):
        rng = random.Random(f"sidecar.catalogue/{seed}/{index}")
        visual = synthetic.sample_attributes(rng)
        image = synthetic.render(visual, size=size, rng=rng)
        attributes = {**visual, "brand": rng.choice(BRANDS), "material": rng.choice(MATERIALS),
                      "code": product_code(seed, index, rng)}
        yield Product(id=f"p{index:05d}", title=_title(attributes, rng), attributes=attributes, image=image)


def _title(attrs: Mapping[str, str], rng: random.Random) -> str:
    brand = attrs["brand"]
    if rng.random() < P_BRAND_TYPO and len(brand) > 3:
        cut = rng.randrange(1, len(brand) - 2)
        brand = brand[:cut] + brand[cut + 1] + brand[cut] + brand[cut + 2:]  # two letters swapped
    colour = ""
    if rng.random() < P_TITLE_COLOR:
        colour = attrs["color"] if rng.random() >= P_WRONG_COLOR else rng.choice(
            [c for c in synthetic.COLORS if c != attrs["color"]])
    size = attrs["size"] if rng.random() < P_TITLE_SIZE else ""
    shape = attrs["shape"] if rng.random() < P_TITLE_SHAPE else ""
    noun = rng.choice(NOUNS)
    described = " ".join(word for word in (size, colour, attrs["material"], shape, noun) if word)
    if rng.random() < 0.5:
        return f"{brand} {described} · {attrs['code']}"
    return f"{described} by {brand} · {attrs['code']}"


def make_queries(products: list[Product], *, per_category: int, seed: int) -> list[BenchmarkQuery]:
    """`per_category` distinct queries of each kind, each aimed at a product of the catalogue."""
    rng = random.Random(f"sidecar.catalogue/queries/{seed}")
    held_out = [p for p in products if synthetic.is_held_out(p.attributes)]
    in_distribution = [p for p in products if not synthetic.is_held_out(p.attributes)]
    queries: list[BenchmarkQuery] = []
    for category in CATEGORIES:
        texts: set[str] = set()
        attempts = 0
        while len(texts) < per_category:
            attempts += 1
            if attempts > per_category * 50:
                raise ValueError(f"cannot draw {per_category} distinct {category} queries from "
                                 f"{len(products)} products; use a larger catalogue")
            ood = category != "text-heavy" and held_out and rng.random() < P_OUT_OF_DISTRIBUTION
            target = rng.choice(held_out if ood else in_distribution)
            text, named = _query_for(category, target.attributes, rng)
            if text in texts:
                continue
            texts.add(text)
            queries.append(BenchmarkQuery(id=f"{category}-{len(texts):03d}", text=text, category=category,
                                          named=named, out_of_distribution=synthetic.is_held_out(named)))
    return queries


def _query_for(category: str, attrs: Mapping[str, str], rng: random.Random) -> tuple[str, dict[str, str]]:
    if category == "text-heavy":
        if rng.random() < 0.4:
            return attrs["code"], {"code": attrs["code"]}
        named = {k: attrs[k] for k in ("brand", "material", "shape")}
        words = [named["brand"], named["material"], named["shape"]]
        rng.shuffle(words)
        return " ".join(words), named
    if category == "image-heavy":
        extra = rng.choice((("size", "position"), ("position",)))
        named = {k: attrs[k] for k in ("shape", "color", *extra)}
        return synthetic.compose_caption(named, template=rng.randrange(len(synthetic.CAPTION_TEMPLATES)),
                                         position_phrase=rng.randrange(2)), named
    lexical = rng.choice(("brand", "material"))
    extra = rng.choice(((), ("size",), ("position",)))
    named = {k: attrs[k] for k in (lexical, "color", "shape", *extra)}
    visual = synthetic.compose_caption({k: v for k, v in named.items() if k in VISUAL and k != "shape"} | {
        "shape": named["shape"]}, template=1, position_phrase=rng.randrange(2))
    if lexical == "brand":
        return f"{named['brand']} {visual}", named
    words = visual.split()
    at = words.index(named["shape"])  # the material reads as an adjective: "large red wool star"
    return " ".join(words[:at] + [named["material"]] + words[at:]), named


def grade(named: Mapping[str, str], attributes: Mapping[str, str]) -> int:
    """2 if the product has every named attribute, 1 if all but one (of three or more), else 0."""
    missed = sum(attributes.get(key) != value for key, value in named.items())
    if missed == 0:
        return 2
    return 1 if missed == 1 and len(named) >= 3 else 0


def judgments(queries: list[BenchmarkQuery], products: list[Product]) -> dict[str, dict[str, int]]:
    """query id -> {product id: grade} for every product with a grade above 0."""
    return {q.id: {p.id: g for p in products if (g := grade(q.named, p.attributes)) > 0} for q in queries}


@dataclass(frozen=True, slots=True)
class CatalogueFiles:
    manifest: Path  # the corpus: images + manifest.jsonl (text = title, metadata = every attribute)
    queries: Path  # queries.jsonl
    qrels: Path  # qrels.txt, TREC format


def write_catalogue(folder: Path | str, n: int, *, queries_per_category: int, seed: int = 0,
                    progress: bool = False) -> CatalogueFiles:
    """Render the catalogue into `folder/corpus` and write its queries and graded judgments."""
    folder = Path(folder)
    products = list(iter_products(n, seed=seed))
    manifest = synthetic.write_manifest_corpus(
        folder / "corpus", ((p.id, p.image, p.title, p.attributes) for p in products), total=n, progress=progress)
    queries = make_queries(products, per_category=queries_per_category, seed=seed)
    qrels = judgments(queries, products)
    queries_path = folder / "queries.jsonl"
    queries_path.write_text("".join(json.dumps(q.to_json()) + "\n" for q in queries), encoding="utf-8")
    qrels_path = folder / "qrels.txt"
    qrels_path.write_text("".join(f"{qid} 0 {doc} {g}\n" for qid, docs in qrels.items() for doc, g in docs.items()),
                          encoding="utf-8")
    log.info("benchmark catalogue: %d products, %d queries, %d judgments in %s", n, len(queries),
             sum(map(len, qrels.values())), folder)
    return CatalogueFiles(manifest=manifest, queries=queries_path, qrels=qrels_path)
