"""What the store holds, by document id and by metadata: GET /v1/documents/<id>/thumbnail, GET /v1/facets.

A thumbnail is read from the store by id (written there by `embed` and `index`), never from a path:
nothing else on disk is reachable through these endpoints.
"""

from __future__ import annotations

import hashlib

from flask import Blueprint, Response, jsonify, request

from sidecar.api.state import current_state
from sidecar.api.validation import query_parameters
from sidecar.errors import BadRequest, DocumentNotFound, quoted
from sidecar.ingest.thumbnails import MEDIA_TYPE
from sidecar.stores.base import Store
from sidecar.types import Document

bp = Blueprint("documents", __name__)

DEFAULT_FACET_VALUES = 20
MAX_FACET_VALUES = 1000


def held_document(store: Store, doc_id: str, *, field: str, vectors: bool = True) -> Document:
    """The stored document a request names in `field`: 400 for an empty id (no document can have one: the
    schema's minLength), 404 naming the field and the id where there is none."""
    if not doc_id:
        raise BadRequest(f"field '{field}' is empty: send a stored document's id")
    found = store.fetch([doc_id], vectors=vectors)
    if not found:
        raise DocumentNotFound(f"field '{field}': no document with id {quoted(doc_id)} in the store")
    return found[0]


def stored_document(store: Store, doc_id: str, *, field: str) -> Document:
    """`held_document` with its vector: 400 where it has none to search by."""
    document = held_document(store, doc_id, field=field)
    if not document.vector.size:
        raise BadRequest(f"field '{field}': document {quoted(doc_id)} has no vector (an ingest pipeline wrote it without "
                         "the field it embeds): search by its text instead")
    return document


@bp.get("/v1/documents/<id:doc_id>/thumbnail")
def thumbnail(doc_id: str):
    store = current_state().store
    data = store.thumbnail(doc_id)
    if data is None:
        if not store.fetch([doc_id], vectors=False):
            raise DocumentNotFound(f"no document with id {quoted(doc_id)} in the store")
        raise DocumentNotFound(f"document {quoted(doc_id)} has no thumbnail: it was indexed from shards without "
                               "thumbnails (embed with --thumbnail-size above 0, then index again)")
    response = Response(data, mimetype=MEDIA_TYPE)
    # A re-embedded image gets a new thumbnail under the same id: caches revalidate by content.
    response.set_etag(hashlib.sha256(data).hexdigest()[:32])
    response.headers["Cache-Control"] = "no-cache"
    return response.make_conditional(request)


@bp.get("/v1/facets")
@query_parameters("size")
def facets():
    raw = request.args.get("size", str(DEFAULT_FACET_VALUES))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_FACET_VALUES:
        raise BadRequest(f"query parameter 'size' must be an integer between 1 and {MAX_FACET_VALUES}, got {quoted(raw)}")
    store = current_state().store
    counts = store.facets(size=int(raw))
    return jsonify({
        "facets": {name: {"values": [{"value": value, "count": count} for value, count in field.values],
                          "other": field.other}
                   for name, field in sorted(counts.items())},
        "documents": store.count(),
    })
