"""POST /v1/feedback: a clicked or judged document for a query, appended to the feedback log."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from sidecar.api.documents import held_document
from sidecar.api.state import current_state
from sidecar.api.validation import (
    bounded_int,
    choice,
    filter_errors,
    filters,
    is_blank,
    json_body,
    known_fields,
    optional,
    query_text,
)
from sidecar.errors import BadRequest, LogUnwritable, NotEnabled, PayloadTooLarge, quoted
from sidecar.retrieval.hard_examples import FEEDBACK_KINDS, MAX_RELEVANCE, feedback_record
from sidecar.serving import metrics
from sidecar.stores.base import Store, check_filter_fields
from sidecar.types import Document, Filters

bp = Blueprint("feedback", __name__)

FIELDS = ("query_id", "text", "filters", "doc_id", "relevance", "kind")
MAX_ID_CHARS = 512  # a query id: a name, not a text (a document id is held to the ids the store holds)


@bp.post("/v1/feedback")
def feedback():
    state = current_state()
    settings = state.settings
    log = state.quality.feedback
    if log is None:
        raise NotEnabled("feedback is not recorded by this server: set SIDECAR_QUALITY_LOG_DIR (quality_log_dir) "
                         "to a folder for the feedback and hard-example logs")
    body = json_body(request, settings)
    known_fields(body, FIELDS)
    # No length limit: the store holds ids of any length (a folder corpus's deep paths), and answers 404 for others.
    doc_id = _name(body, "doc_id", max_chars=None)
    if doc_id is None:
        raise BadRequest("field 'doc_id' is required: the id of the document clicked or judged")
    query_id = _name(body, "query_id", max_chars=MAX_ID_CHARS)
    text = query_text(body, settings)  # blank: none (a query_id names the query)
    if query_id is None and text is None:
        raise BadRequest("send field 'query_id' (from the /v1/search response) or field 'text' (the query as "
                         f"searched, not blank within its first {settings.max_text_chars} characters, max_text_chars), "
                         "or both")
    kind = choice(body, "kind", choices=FEEDBACK_KINDS, default="click")
    relevance = bounded_int(body, "relevance", default=1, low=0, high=MAX_RELEVANCE)
    # The search's filters: its judgments hold among the documents they let through (the export keeps them, eval
    # re-runs the query with them); without them, those of its search where the hard-example log has it.
    searched = filters(body, settings)
    if searched:
        # A field no stored document holds (a typo): /v1/search refuses it, and `clip-sidecar eval`, re-running the
        # exported query with these filters, refused the whole evaluation set for it.
        with filter_errors(searched):
            check_filter_fields(state.store, searched)
    # A judgment of a document the store does not hold could never be found again by eval, nor paired with its
    # image for fine-tuning: a mistyped id (or one of another index) is refused where the client can see it.
    judged = held_document(state.store, doc_id, field="doc_id", vectors=False)
    if searched:
        _check_filters_let_through(state.store, searched, judged)
    record = feedback_record(query_id=query_id, text=text, doc_id=doc_id, relevance=relevance, kind=kind,
                             filters=searched)
    try:
        written = log.write(record)
    except OSError as exc:
        raise LogUnwritable(f"the feedback log ({log.path.name}) could not be written ({exc.strerror or exc}): nothing "
                            "was recorded") from exc
    if not written:
        raise PayloadTooLarge(f"the feedback record is over the log's file limit of {settings.quality_log_max_bytes} "
                              "bytes (quality_log_max_bytes)")
    metrics.FEEDBACK.labels(kind).inc()
    return jsonify({"recorded": record})


def _check_filters_let_through(store: Store, searched: Filters, judged: Document) -> None:
    """400 naming `filters` where they do not let the judged document through, by the store's own match (which
    refuses a value of the wrong type for the field as a search does): eval, re-running the query under them,
    refused the whole evaluation set for a value of the wrong type, and could never find a document they
    exclude."""
    with filter_errors(searched):
        matched = store.filtered_ids([judged.id], searched)
    if not matched:
        raise BadRequest(f"field 'filters' does not let through the judged document {quoted(judged.id)} (field "
                         "'doc_id'): a search under them could never show it; send the filters of the search that "
                         "showed it")


def _name(body: dict, field: str, *, max_chars: int | None) -> str | None:
    value = optional(body, field, str)
    if value is None:
        return None
    if is_blank(value):
        raise BadRequest(f"field '{field}' is blank")
    if max_chars is not None and len(value) > max_chars:
        raise BadRequest(f"field '{field}' has {len(value)} characters, over the limit of {max_chars}")
    return value
