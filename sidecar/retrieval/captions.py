"""Image → text: the stored captions that best describe a query image.

BM25 cannot take an image, and the store indexes image vectors only, so captions are ranked the
way CLIP matches an image with a text: the query image's vector against each caption's text
vector, by the same model. Which captions: those of the N stored images nearest the query (one
vector search, filters applied), so a request encodes at most N texts (through the text-vector
cache: a caption is encoded once per worker and prompt version), never the whole collection.
A caption many documents share (a product title, say) is one result, listing those documents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from sidecar.stores.base import Store, check_filter_fields
from sidecar.types import Filters


@dataclass(frozen=True, slots=True)
class Caption:
    text: str
    score: float  # cosine of the query image and the caption's text vector
    ids: list[str]  # the candidate documents carrying this text, nearest image first

    def to_dict(self) -> dict:
        return {"text": self.text, "score": self.score, "ids": list(self.ids)}


@dataclass(frozen=True, slots=True)
class CaptionResult:
    captions: list[Caption]
    timings_s: dict[str, float]  # coarse (the vector search), captions (fetch, encode and score the texts)


def rank_captions(store: Store, vector: np.ndarray, *, encode_texts: Callable[[Sequence[str]], np.ndarray], k: int,
                  candidates: int, filters: Filters | None = None, exact: bool = False,
                  ef_search: int | None = None) -> CaptionResult:
    """The `k` captions that best match the image whose unit vector is `vector`, among the texts of
    its `candidates` nearest stored images; `encode_texts` gives the model's unit text vectors."""
    started = time.perf_counter()
    nearest = store.vector_search(vector, max(candidates, k), filters=filters, exact=exact, ef_search=ef_search)
    if not nearest and filters:
        check_filter_fields(store, filters)
    coarse_done = time.perf_counter()
    by_text: dict[str, list[str]] = {}
    for doc in store.fetch([hit.id for hit in nearest], vectors=False):
        if doc.text.strip():
            by_text.setdefault(doc.text, []).append(doc.id)
    texts = list(by_text)
    captions: list[Caption] = []
    if texts:
        scores = np.asarray(encode_texts(texts), dtype=np.float32) @ np.asarray(vector, dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[:k]
        captions = [Caption(text=texts[i], score=float(scores[i]), ids=by_text[texts[i]]) for i in order]
    return CaptionResult(captions=captions, timings_s={"coarse": coarse_done - started,
                                                      "captions": time.perf_counter() - coarse_done})
