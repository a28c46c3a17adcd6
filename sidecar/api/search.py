"""POST /v1/search: text, image or both → coarse retrieval (vector / bm25 / hybrid) → the fine stage (rerank)."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from sidecar.api.state import current_state
from sidecar.api.validation import (
    bounded_int,
    choice,
    decode_images,
    filters,
    image_bytes,
    is_blank,
    json_body,
    known_fields,
    optional,
)
from sidecar.errors import BadRequest
from sidecar.retrieval.fusion import FUSION_METHODS
from sidecar.retrieval.search import MODES, SearchOptions, query_vector, search
from sidecar.serving import metrics
from sidecar.stores.base import StoreQueryError

bp = Blueprint("search", __name__)

FIELDS = ("text", "image", "mode", "k", "candidates", "fusion", "weights", "rerank", "exact", "ef_search", "filters")
DEFAULT_WEIGHTS = dict(zip(("vector", "bm25"), SearchOptions().weights))
MAX_EF_SEARCH = 4096  # HNSW search breadth a request may ask for


@bp.post("/v1/search")
def search_endpoint():
    state = current_state()
    settings = state.settings
    body = json_body(request, settings)
    known_fields(body, FIELDS)
    text = optional(body, "text", str)
    if text is not None and is_blank(text):
        text = None  # blank text beside an image: an image query
    image = optional(body, "image", str)
    if text is None and image is None:
        raise BadRequest("send field 'text' (not blank), field 'image' (base64), or both")
    mode = choice(body, "mode", choices=MODES, default="hybrid" if text else "vector")
    if mode != "vector" and text is None:
        raise BadRequest(f"field 'text' is required for mode {mode}; an image-only query uses mode vector")
    k = bounded_int(body, "k", default=10, low=1, high=settings.max_k)
    options = _options(body, mode=mode, k=k, settings=settings)
    data = image_bytes(image, field="image", max_bytes=settings.max_body_bytes) if image is not None else None
    pixels = decode_images([("image", data)], encoding=state.encoding, settings=settings) if data is not None else []
    started = time.perf_counter()
    # Every mode but bm25 searches by the fast model's vector; the fine stage needs the query by the
    # fine model, which only it can encode (an image through the fine model's own preprocessing).
    vector = _query(state.encoding, text=text if mode != "bm25" else None, pixels=pixels if mode != "bm25" else [])
    fine = state.fine_encoding if options.rerank else None
    fine_vector = None
    if fine is not None:
        fine_pixels = decode_images([("image", data)], encoding=fine, settings=settings) if data is not None else []
        fine_vector = _query(fine, text=text, pixels=fine_pixels)
    encoded = time.perf_counter()
    try:
        result = search(state.store, vector=vector, text=text, options=options, fine_vector=fine_vector)
    except StoreQueryError as exc:
        if not options.filters:
            raise  # a query the sidecar built alone: the store's error, not the request's
        raise BadRequest(f"field 'filters' does not fit the types of the stored metadata: {exc}") from exc
    metrics.STAGE_SECONDS.labels("search", mode).observe(result.timings_s["coarse"])
    metrics.STAGE_SECONDS.labels("rerank", mode).observe(result.timings_s["rerank"])
    body = {
        "hits": [hit.to_dict() for hit in result.hits],
        "mode": mode, "fusion": options.fusion, "rerank": result.reranked, "store": state.store.name,
        "took_ms": {"encode": 1000 * (encoded - started), "coarse": 1000 * result.timings_s["coarse"],
                    "rerank": 1000 * result.timings_s["rerank"]},
    }
    if result.reranked:
        body["fine_model"] = fine.encoder.signature.describe()
    if result.rerank_skipped:
        body["rerank_skipped"] = result.rerank_skipped
    return jsonify(body)


def _query(encoding, *, text: str | None, pixels: list):
    """The query by one model: its text vector, its image vector, or the two combined; None for neither."""
    text_vector = encoding.encode_texts([text]).vectors[0] if text is not None else None
    image_vector = encoding.encode_images(pixels)[0] if pixels else None
    return query_vector(text_vector, image_vector)


def _options(body: dict, *, mode: str, k: int, settings) -> SearchOptions:
    return SearchOptions(
        mode=mode, k=k,
        # Fewer candidates than k would return fewer hits than asked: SearchOptions raises it to k.
        candidates=bounded_int(body, "candidates", default=max(settings.rerank_candidates, k), low=1,
                               high=settings.max_k),
        fusion=choice(body, "fusion", choices=FUSION_METHODS, default="minmax"),
        weights=_weights(body),
        rerank=optional(body, "rerank", bool),  # None: the mode's default (off for bm25)
        exact=optional(body, "exact", bool, False),
        ef_search=_ef_search(body),
        filters=filters(body, settings),
    )


def _ef_search(body: dict) -> int | None:
    if body.get("ef_search") is None:
        return None  # the store's setting
    return bounded_int(body, "ef_search", default=0, low=1, high=MAX_EF_SEARCH)


def _weights(body: dict) -> tuple[float, float]:
    value = optional(body, "weights", dict, DEFAULT_WEIGHTS)
    known_fields(value, tuple(DEFAULT_WEIGHTS), where="object weights")
    weights = []
    for name, default in DEFAULT_WEIGHTS.items():
        weight = optional(value, name, (int, float), default, name=f"weights.{name}")
        if not 0 <= weight <= 100:
            raise BadRequest(f"field 'weights.{name}' must be a number between 0 and 100, got {weight}")
        weights.append(float(weight))
    if sum(weights) == 0:
        raise BadRequest("field 'weights' must not be all zero")
    return weights[0], weights[1]
