"""POST /v1/captions: image → text, the stored captions that best describe an uploaded image (or a stored
document's image); how they are ranked: `sidecar.retrieval.captions`."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from sidecar.api.documents import stored_document
from sidecar.api.state import current_state
from sidecar.api.validation import (
    bounded_int,
    decode_images,
    ef_search_field,
    filter_errors,
    filters,
    image_bytes,
    json_body,
    known_fields,
    optional,
)
from sidecar.errors import BadRequest
from sidecar.retrieval.captions import rank_captions
from sidecar.retrieval.search import DEFAULT_K

bp = Blueprint("captions", __name__)

FIELDS = ("image", "like", "k", "candidates", "exact", "ef_search", "filters")


@bp.post("/v1/captions")
def captions_endpoint():
    state = current_state()
    settings = state.settings
    body = json_body(request, settings)
    known_fields(body, FIELDS)
    image = optional(body, "image", str)
    like = optional(body, "like", str)
    if (image is None) == (like is None):
        raise BadRequest("send field 'image' (base64) or field 'like' (a stored document's id): one of the two")
    k = bounded_int(body, "k", default=DEFAULT_K, low=1, high=settings.max_k, setting="max_k")
    candidates = bounded_int(body, "candidates", default=max(settings.rerank_candidates, k), low=1, high=settings.max_k,
                             setting="max_k")
    exact = optional(body, "exact", bool, False)
    ef_search = ef_search_field(body)
    wanted = filters(body, settings)
    liked = stored_document(state.store, like, field="like") if like is not None else None
    # The captions are ranked by this server's text vectors, even for `like`: checked after the liked document's
    # read, which reads the store's record again where another model's rebuild moved the index under it.
    state.check_store_model()
    started = time.perf_counter()
    if liked is None:
        data = image_bytes(image, field="image", max_bytes=settings.max_body_bytes)
        pixels = decode_images([("image", data)], encoding=state.encoding, settings=settings)
        vector = state.encoding.encode_images(pixels)[0]
    else:
        vector = liked.vector
    encoded = time.perf_counter()
    with filter_errors(wanted):
        result = rank_captions(state.store, vector, encode_texts=lambda texts: state.encoding.encode_texts(texts).vectors,
                               k=k, candidates=candidates, filters=wanted, exact=exact, ef_search=ef_search)
    return jsonify({
        "captions": [caption.to_dict() for caption in result.captions],
        "store": state.store.name,
        "took_ms": {"encode": 1000 * (encoded - started), "coarse": 1000 * result.timings_s["coarse"],
                    "captions": 1000 * result.timings_s["captions"]},
    })
