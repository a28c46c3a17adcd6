"""POST /v1/search: text, image (or a stored document: `like`) or both → coarse retrieval (vector / bm25 /
hybrid) → the fine stage (rerank); `offset` pages through the ranking."""

from __future__ import annotations

import dataclasses
import time
import uuid

from flask import Blueprint, jsonify, request

from sidecar.api.documents import stored_document
from sidecar.api.state import current_state
from sidecar.api.validation import (
    bounded_int,
    choice,
    decode_images,
    ef_search_field,
    filter_errors,
    filters,
    image_bytes,
    json_body,
    known_fields,
    optional,
    query_text,
)
from sidecar.errors import BadRequest, quoted
from sidecar.retrieval.fine import fine_size_mismatch
from sidecar.retrieval.fusion import FUSION_METHODS
from sidecar.retrieval.search import (
    DEFAULT_K,
    MAX_WEIGHT,
    MODES,
    NO_FINE_MODEL,
    SearchOptions,
    check_query_image_used,
    past_window_depth,
    query_vector,
    search,
)
from sidecar.serving import metrics
from sidecar.serving.encoding import EncodingService
from sidecar.types import Document

bp = Blueprint("search", __name__)

FIELDS = ("text", "image", "mode", "k", "candidates", "fusion", "weights", "rerank", "exact", "ef_search", "filters",
          "like", "offset")
DEFAULT_WEIGHTS = dict(zip(("vector", "bm25"), SearchOptions().weights))


@bp.post("/v1/search")
def search_endpoint():
    state = current_state()
    settings = state.settings
    body = json_body(request, settings)
    known_fields(body, FIELDS)
    text = query_text(body, settings)  # blank text beside an image: an image query
    image = optional(body, "image", str)
    like = optional(body, "like", str)
    if text is None and image is None and like is None:
        raise BadRequest(f"send field 'text' (not blank within its first {settings.max_text_chars} characters, "
                         "max_text_chars), field 'image' (base64) or field 'like' (a stored document's id), or text "
                         "with one of the other two")
    if image is not None and like is not None:
        raise BadRequest("send field 'image' or field 'like', not both: each is the query's image")
    mode = choice(body, "mode", choices=MODES, default="hybrid" if text else "vector")
    if mode != "vector" and text is None:
        raise BadRequest(f"field 'text' is required for mode {mode}; a query by field 'image' or 'like' alone uses "
                         "mode vector")
    k = bounded_int(body, "k", default=DEFAULT_K, low=1, high=settings.max_k, setting="max_k")
    offset = bounded_int(body, "offset", default=0, low=0, high=settings.max_k - 1, setting="max_k - 1")
    # A page reaching past max_k ends there: paging by next_offset at any k reaches every rank up to max_k.
    end = min(offset + k, settings.max_k)
    options = _options(body, mode=mode, end=end, settings=settings)
    if image is not None or like is not None:
        try:
            check_query_image_used(options, fine_model=state.fine_encoding is not None)
        except ValueError as exc:
            raise BadRequest(f"field '{'image' if image is not None else 'like'}': {exc}") from exc
    data = image_bytes(image, field="image", max_bytes=settings.max_body_bytes) if image is not None else None
    pixels = decode_images([("image", data)], encoding=state.encoding, settings=settings) if data is not None else []
    liked = stored_document(state.store, like, field="like") if like is not None else None
    if mode != "bm25" and (text is not None or data is not None):
        state.check_store_model()  # this server encodes the query; `like` alone searches by a stored vector
    started = time.perf_counter()
    # Every mode but bm25 searches by the fast model's vector; the fine stage needs the query by the
    # fine model, which only it can encode (an image through the fine model's own preprocessing; a
    # stored document's own fine vector).
    vector = _query(state.encoding, text=text if mode != "bm25" else None, pixels=pixels if mode != "bm25" else [],
                    stored=liked.vector if liked is not None and mode != "bm25" else None)
    fine = state.fine_encoding if options.rerank else None
    fine_vector = None
    no_fine_vector = NO_FINE_MODEL
    unusable_like = _unusable_fine_vector(liked, fine) if fine is not None and liked is not None else None
    if unusable_like:
        no_fine_vector = unusable_like
    elif fine is not None:
        fine_pixels = decode_images([("image", data)], encoding=fine, settings=settings) if data is not None else []
        fine_vector = _query(fine, text=text, pixels=fine_pixels, stored=liked.fine_vector if liked else None)
    encoded = time.perf_counter()
    with filter_errors(options.filters):
        result = search(state.store, vector=vector, text=text, options=options, fine_vector=fine_vector,
                        fine_model=fine.encoder.signature if fine is not None else None,
                        no_fine_vector=no_fine_vector)
    more = end < settings.max_k and len(result.hits) > end
    # Stages of the store, not of a model: no `model` label value. A rerank is counted only where the fine
    # stage ran: a series of zeros would count reranks that never happened.
    metrics.STAGE_SECONDS.labels("search", mode, "").observe(result.timings_s["coarse"])
    if result.reranked:
        metrics.STAGE_SECONDS.labels("rerank", mode, "").observe(result.timings_s["rerank"])
    query_id = uuid.uuid4().hex  # names this search in POST /v1/feedback and the hard-example log
    # The hard-example log sees the ranking down to this page's end, as the client was shown it, and its
    # top K is the page's end: not the one hit past the page that `options.k` asked for to tell whether a
    # next page exists.
    state.quality.observe_search(query_id=query_id, text=text, image=data, vector=vector,
                                 options=dataclasses.replace(options, k=end),
                                 result=dataclasses.replace(result, hits=result.hits[:end]),
                                 model=state.encoding.encoder.name)
    body = {
        "query_id": query_id,
        "hits": [hit.to_dict() for hit in result.hits[offset:end]],
        "offset": offset,
        "mode": mode, "fusion": options.fusion, "rerank": result.reranked, "store": state.store.name,
        "took_ms": {"encode": 1000 * (encoded - started), "coarse": 1000 * result.timings_s["coarse"],
                    "fetch": 1000 * result.timings_s["fetch"]},
    }
    if result.reranked:  # a stage that did not run has no latency to show
        body["took_ms"]["rerank"] = 1000 * result.timings_s["rerank"]
        body["fine_model"] = fine.encoder.signature.describe()
    if result.rerank_skipped:
        body["rerank_skipped"] = result.rerank_skipped
    if more:
        body["next_offset"] = end
    if end < offset + k and len(result.hits) == end:
        # Short of k because max_k stopped the page, not because the ranking ended: a short page without
        # it is the ranking's last.
        body["cut_at_max_k"] = True
    return jsonify(body)


def _unusable_fine_vector(liked: Document, fine: EncodingService) -> str | None:
    """Why the liked document's fine vector cannot be the fine model's query (alone or with the text's), or None."""
    if liked.fine_vector is None:
        # The fine model has no view of the liked document: with text, its query would be the text alone,
        # and the fine stage would rank the `like` half of the query away. Skipped, as without text.
        return f"the liked document {quoted(liked.id)} has no fine-model vector: embed it with --fine-model and index again"
    # Another fine model's vector: the text's vector by this one cannot be added to it (numpy refuses two sizes),
    # and ranking by it would be in another model's space under this one's name.
    return fine_size_mismatch(len(liked.fine_vector), model_size=fine.encoder.dim,
                              whose=f"the liked document {quoted(liked.id)} has a fine vector of")


def _query(encoding, *, text: str | None, pixels: list, stored=None):
    """The query by one model: its text vector, its image vector (encoded from `pixels`, or a stored
    document's vector), or the two combined; None for neither."""
    text_vector = encoding.encode_texts([text]).vectors[0] if text is not None else None
    image_vector = encoding.encode_images(pixels)[0] if pixels else stored
    return query_vector(text_vector, image_vector)


def _options(body: dict, *, mode: str, end: int, settings) -> SearchOptions:
    # The ranking is down to the page's end and one hit past it, which tells whether there is a next page.
    # Its first `candidates` ranks are the fine stage's whatever the page; the ranks past them come from a
    # coarse search max_k deep for every page that shows some, so that those pages are slices of one ranking.
    # The page ending at the candidates shows none: the one rank past them only has to exist, which a search
    # one deeper than the candidates tells (it holds candidates + 1 ids, or the store has no more), not max_k.
    candidates = bounded_int(body, "candidates", default=settings.rerank_candidates, low=1, high=settings.max_k,
                             setting="max_k")
    return SearchOptions(
        mode=mode, k=min(end + 1, settings.max_k), candidates=candidates,
        depth=past_window_depth(end, candidates=candidates, max_k=settings.max_k),
        fusion=choice(body, "fusion", choices=FUSION_METHODS, default="minmax"),
        weights=_weights(body),
        rerank=optional(body, "rerank", bool),  # None: the mode's default (off for bm25)
        exact=optional(body, "exact", bool, False),
        ef_search=ef_search_field(body),
        filters=filters(body, settings),
    )


def _weights(body: dict) -> tuple[float, float]:
    value = optional(body, "weights", dict, DEFAULT_WEIGHTS)
    known_fields(value, tuple(DEFAULT_WEIGHTS), where="object weights")
    weights = []
    for name, default in DEFAULT_WEIGHTS.items():
        weight = optional(value, name, (int, float), default, name=f"weights.{name}")
        if not 0 <= weight <= MAX_WEIGHT:
            raise BadRequest(f"field 'weights.{name}' must be a number between 0 and {MAX_WEIGHT:g}, got {weight}")
        weights.append(float(weight))
    if sum(weights) == 0:
        raise BadRequest("field 'weights' must not be all zero")
    return weights[0], weights[1]
