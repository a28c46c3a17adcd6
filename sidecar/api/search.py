"""POST /v1/search: text, image or both → coarse retrieval (vector / bm25 / hybrid) → the fine stage (rerank)."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from sidecar.api.state import current_state
from sidecar.api.validation import (
    bounded_int,
    choice,
    image_pixels,
    json_body,
    optional,
)
from sidecar.errors import BadRequest
from sidecar.retrieval.fusion import FUSION_METHODS
from sidecar.retrieval.search import MODES, SearchOptions, query_vector, search
from sidecar.serving import metrics

bp = Blueprint("search", __name__)

MAX_EF_SEARCH = 4096  # HNSW search breadth a request may ask for


@bp.post("/v1/search")
def search_endpoint():
    state = current_state()
    settings = state.settings
    body = json_body(request)
    text = optional(body, "text", str)
    image_b64 = optional(body, "image", str)
    if not (text and text.strip()) and image_b64 is None:
        raise BadRequest("send field 'text', field 'image' (base64), or both")
    mode = choice(body, "mode", choices=MODES, default="hybrid" if text else "vector")
    if mode != "vector" and not (text and text.strip()):
        raise BadRequest(f"field 'text' is required for mode {mode}; an image-only query uses mode vector")
    k = bounded_int(body, "k", default=10, low=1, high=settings.max_k)
    try:
        options = _options(body, mode=mode, k=k, settings=settings)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    started = time.perf_counter()
    # Every mode but bm25 searches by the fast model's vector; the fine stage needs the query by the
    # fine model, which only it can encode.
    vector = _query(state.encoding, text=text if mode != "bm25" else None,
                    image=image_b64 if mode != "bm25" else None, settings=settings)
    fine = state.fine_encoding if options.rerank else None
    fine_vector = _query(fine, text=text, image=image_b64, settings=settings) if fine else None
    encoded = time.perf_counter()
    result = search(state.store, vector=vector, text=text, options=options, fine_vector=fine_vector)
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


def _query(encoding, *, text: str | None, image: str | None, settings):
    """The query by one model: its text vector, its image vector, or the two combined; None for neither."""
    text_vector = encoding.encode_texts([text]).vectors[0] if text and text.strip() else None
    image_vector = None
    if image is not None:
        pixels = image_pixels(image, field="image", encoding=encoding, max_bytes=settings.max_body_bytes)
        image_vector = encoding.encode_images([pixels])[0]
    return query_vector(text_vector, image_vector)


def _options(body: dict, *, mode: str, k: int, settings) -> SearchOptions:
    return SearchOptions(
        mode=mode, k=k,
        candidates=bounded_int(body, "candidates", default=max(settings.rerank_candidates, k), low=k,
                               high=settings.max_k),
        fusion=choice(body, "fusion", choices=FUSION_METHODS, default="minmax"),
        weights=_weights(body),
        rerank=optional(body, "rerank", bool),  # None: the mode's default (off for bm25)
        exact=optional(body, "exact", bool, False),
        ef_search=_ef_search(body),
        filters=_filters(body),
    )


def _ef_search(body: dict) -> int | None:
    if body.get("ef_search") is None:
        return None  # the store's setting
    return bounded_int(body, "ef_search", default=0, low=1, high=MAX_EF_SEARCH)


def _weights(body: dict) -> tuple[float, float]:
    value = optional(body, "weights", dict, {"vector": 0.7, "bm25": 0.3})
    unknown = set(value) - {"vector", "bm25"}
    if unknown:
        raise BadRequest(f"field 'weights' takes keys vector and bm25, got {', '.join(sorted(unknown))}")
    weights = (value.get("vector", 0.7), value.get("bm25", 0.3))
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 100 for w in weights):
        raise BadRequest(f"field 'weights' values must be numbers between 0 and 100, got {value}")
    if sum(weights) == 0:
        raise BadRequest("field 'weights' must not be all zero")
    return float(weights[0]), float(weights[1])


def _filters(body: dict) -> dict | None:
    value = optional(body, "filters", dict)
    if not value:
        return None
    for field, wanted in value.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise BadRequest(f"field 'filters.{field}' must be a string, number, boolean or a non-empty list of them")
    return value
