"""The endpoints OpenSearch calls through ml-commons HTTP connectors (`clip-sidecar opensearch connect`).

ml-commons sends every embedding call as {"input": [...]} and cannot say what the list is: a batch
of texts (the text_embedding processor, _predict) or one document [text or null, image] (the
text_image_embedding processor, a neural query_image), and of the latter it keeps only the FIRST
vector answered. So each call shape has a URL of its own, which the connector names:

- POST /v1/opensearch/embeddings/texts: a batch of texts → one vector per text, in input order.
- POST /v1/opensearch/embeddings/text-image: one document → exactly one vector: [text] → the text's,
  [null, image] → the image's, [text, image] → their normalised sum (the rule /v1/search uses for a
  text+image query).
- POST /v1/opensearch/rerank/<ids|texts|images>: the rerank processor's query and documents (Cohere's
  shape) → a float score for every document, in input order, from the rerank /v1/search runs.

A call of another shape (a null or an image on the texts URL, several texts on the text-image URL)
answers 400 naming the URL that serves it: no vector is silently dropped or misread. The connector
URL may pin the model (`?model=…&weights=…`, and `&index=…` for rerank/ids); a sidecar serving
another model answers 404, so vectors of two models never meet in one index. Every 429/503 from
here carries `x-amzn-ErrorType: ThrottlingException`, the only signal that makes ml-commons retry.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Any, Callable

import numpy as np
from flask import Blueprint, Response, jsonify, request

from sidecar.api.embeddings import embeddings_body
from sidecar.api.search import DEFAULT_WEIGHTS
from sidecar.api.state import AppState, current_state
from sidecar.api.validation import (
    decode_images,
    image_bytes,
    is_blank,
    json_body,
    json_type,
    known_fields,
    open_images,
    optional,
    query_parameters,
    query_text,
)
from sidecar.errors import BadRequest, ModelNotFound, PayloadTooLarge, UnsupportedMediaType, quoted
from sidecar.model.images import sniff_format
from sidecar.retrieval.fine import UnusableFineVectors, fine_rank
from sidecar.retrieval.search import NO_FINE_MODEL, SearchOptions, query_vector
from sidecar.serving import metrics
from sidecar.serving.encoding import EncodingService
from sidecar.stores.ml_commons import RERANK_PATH, TEXT_IMAGE_PATH, TEXTS_PATH
from sidecar.types import Document

bp = Blueprint("opensearch_native", __name__)

EMBEDDING_FIELDS = ("input", "model", "user", "encoding_format")
RERANK_FIELDS = ("query", "documents", "top_n", "model", "return_documents")
RERANK_KINDS = ("ids", "texts", "images")
PINS = ("model", "weights")  # the query parameters of a connector's URL (sidecar.stores.ml_commons._sidecar_url)
# ml-commons retries a remote call only when the answer carries this header (any status), up to the
# connector's client_config.max_retry_times; without it a 503 fails the bulk item or the search.
THROTTLING_HEADER = ("x-amzn-ErrorType", "ThrottlingException")
# The rerank of /v1/search with its default options: both paths rank alike.
RERANK_OPTIONS = SearchOptions(fusion="minmax", weights=(DEFAULT_WEIGHTS["vector"], DEFAULT_WEIGHTS["bm25"]))
# A blank document (the hit lacks the field the rerank processor reads) has nothing to score: it ranks
# below every scored one (cosines are >= -1, min-max fused scores >= 0).
BLANK_SCORE = -2.0
# ml-commons' JSON reader (json-smart) turns a number written with more than 18 characters into a
# BigDecimal, which its Cohere rerank post-process cannot cast to Double (500 class_cast_exception):
# Python writes up to 17 digits ("-0.09244738817214966" is 20 characters). 7 decimals keep every
# score short, and finer than float32 vectors can tell apart anyway.
SCORE_DECIMALS = 7
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_SNIFF_CHARS = 16  # base64 characters holding the first 12 bytes: enough for every image signature
_BASE64_SPACING = dict.fromkeys(map(ord, "\t\n\r "))  # MIME wraps base64 at 76 columns


@bp.after_request
def mark_retryable(response: Response) -> Response:
    if response.status_code in (429, 503):
        response.headers[THROTTLING_HEADER[0]] = THROTTLING_HEADER[1]
    return response


@bp.post(TEXTS_PATH)
@query_parameters(*PINS)
def embed_texts():
    """A batch of texts (text_embedding with batch_size, the connector's step size) → one vector each."""
    state, body = _request_body(EMBEDDING_FIELDS)
    inputs = _inputs(body, limit=state.settings.max_batch_items)
    metrics.REQUEST_ITEMS.labels(TEXTS_PATH).observe(len(inputs))
    for i, item in enumerate(inputs):
        if item is None:
            raise BadRequest(f"field 'input[{i}]' is null: this URL embeds a batch of texts; [null, image] is the "
                             "call of text_image_embedding or a neural query_image, which belongs at "
                             f"{TEXT_IMAGE_PATH}")
        if not isinstance(item, str):
            raise BadRequest(f"field 'input[{i}]' must be a string, got {json_type(item)}")
        image_format = _image_format(item)
        if image_format:
            raise BadRequest(f"field 'input[{i}]' is a base64 {image_format} image: this URL embeds texts only "
                             f"(the image would be embedded as text); send one document [text or null, image] "
                             f"to {TEXT_IMAGE_PATH}")
        # As the model sees it (cut at max_text_chars): a blank text's vector is that of the start and end
        # tokens alone, one for every blank text and near nothing meant. neural-search refuses blank fields
        # before it calls; a direct _predict does not.
        if is_blank(item[:state.settings.max_text_chars]):
            raise BadRequest(f"field 'input[{i}]' is blank (within its first {state.settings.max_text_chars} "
                             "characters, max_text_chars, the text embedded): there is nothing to embed; leave it "
                             "out of the _predict's text_docs")
    encoded = state.encoding.encode_texts(inputs)
    return jsonify(embeddings_body(list(encoded.vectors), encoder=state.encoding.encoder,
                                   truncated=encoded.truncated, tokens=encoded.tokens))


@bp.post(TEXT_IMAGE_PATH)
@query_parameters(*PINS)
def embed_text_image():
    """One document or query → exactly one vector (ml-commons keeps only the first one answered)."""
    state, body = _request_body(EMBEDDING_FIELDS)
    inputs = _inputs(body, limit=None)
    metrics.REQUEST_ITEMS.labels(TEXT_IMAGE_PATH).observe(1)  # one document, whether [text] or [text, image]
    shape = "this URL takes one document: [text], [null, image] or [text, image]"
    if len(inputs) > 2:
        raise BadRequest(f"field 'input' has {len(inputs)} items: {shape}; a batch of texts (text_embedding, "
                         f"_predict with several text_docs) belongs at {TEXTS_PATH}")
    text, image = inputs[0], inputs[1] if len(inputs) == 2 else None
    if text is not None and not isinstance(text, str):
        raise BadRequest(f"field 'input[0]' must be a text or null, got {json_type(text)}")
    if text is not None and _image_format(text):
        raise BadRequest(f"field 'input[0]' is a base64 {_image_format(text)} image: {shape} (the image second)")
    if text is not None and is_blank(text):
        text = None  # blank text beside an image: the image alone, as in /v1/search
    if len(inputs) == 2:
        image = _document_image(image, field="input[1]", shape=shape, state=state)
    elif text is None:
        raise BadRequest(f"field 'input[0]' is {'null' if inputs[0] is None else 'blank'}: {shape}")
    # No text encodes nothing (no vector, nothing cut, 0 tokens); the text's index in `truncated` is
    # 0, its place in `input`, as the texts URL would list it.
    encoded = state.encoding.encode_texts([text] if text is not None else [])
    text_vector = encoded.vectors[0] if text is not None else None
    image_vector = state.encoding.encode_images([image])[0] if image is not None else None
    vector = query_vector(text_vector, image_vector)
    return jsonify(embeddings_body([vector], encoder=state.encoding.encoder, truncated=encoded.truncated,
                                   tokens=encoded.tokens))


def rerank_documents(kind: str):
    """The rerank processor's page: a score for every document, in input order, as Cohere answers."""
    state, body = _request_body(RERANK_FIELDS)
    if kind == "ids":
        _check_index(state)
    if "query" not in body:
        raise BadRequest("field 'query' is required: the text the documents are ranked for "
                         "(ext.rerank.query_context in the search request)")
    query = query_text(body, state.settings, field="query")  # as /v1/search cuts its text: for the model and BM25
    if query is None:
        raise BadRequest(f"field 'query' is blank (within its first {state.settings.max_text_chars} characters, "
                         "max_text_chars, the text ranked by): there is nothing to rank the documents for")
    documents = _documents(body, limit=state.settings.max_k if kind == "ids" else state.settings.max_batch_items,
                           setting="max_k" if kind == "ids" else "max_batch_items")
    top_n = optional(body, "top_n", int)
    if top_n is not None and top_n < 1:
        raise BadRequest(f"field 'top_n' must be at least 1, got {top_n}: omit it or send the number of documents")
    if top_n is not None and top_n < len(documents):
        raise BadRequest(f"field 'top_n' is {top_n}, fewer than the {len(documents)} documents: every document is "
                         "scored and answered (OpenSearch's rerank processor needs them all); omit top_n or send "
                         "the number of documents")
    optional(body, "model", str)
    optional(body, "return_documents", bool)
    present = [i for i, document in enumerate(documents) if not is_blank(document)]
    ranked, skipped = _fine_scores(state, kind, query, [documents[i] for i in present],
                                   fields=[f"documents[{i}]" for i in present])
    answer = [BLANK_SCORE] * len(documents)
    for i, score in zip(present, ranked):
        answer[i] = round(float(score), SCORE_DECIMALS)
    result: dict[str, Any] = {"results": [{"index": i, "relevance_score": score} for i, score in enumerate(answer)],
                              "model": state.encoding.encoder.name}
    if state.fine_encoding is not None:
        result["fine_model"] = state.fine_encoding.encoder.signature.describe()
    if skipped:
        # As /v1/search keeps its coarse order when the fine stage cannot run: the page's own order.
        metrics.RERANK_SKIPPED.labels(request.url_rule.rule).inc()
        result["rerank_skipped"] = skipped
    return jsonify(result)


for _kind in RERANK_KINDS:  # one rule per kind: each its own line in /metrics, and its own query parameters
    bp.add_url_rule(RERANK_PATH.format(kind=_kind), endpoint=f"rerank_{_kind}", methods=["POST"],
                    view_func=query_parameters(*PINS, *(("index",) if _kind == "ids" else ()))(
                        functools.partial(rerank_documents)),
                    defaults={"kind": _kind})


def _fine_scores(state: AppState, kind: str, query: str, documents: list[str], *,
                 fields: list[str]) -> tuple[list[float], str | None]:
    """The fine stage's score for each (non-blank) document; where it cannot run (no fine model, or a
    stored document without fine vectors), scores that keep the documents' order, and why. `fields` names
    each document as the request does (`documents[i]`, its place among the blank ones too), for errors."""
    if not documents:
        return [], None
    candidates = CANDIDATES[kind](state, documents, fields)  # checks the documents even when the stage is skipped
    fine = state.fine_encoding
    if fine is None:
        return _page_order(len(documents)), NO_FINE_MODEL
    lexical = None
    if kind == "ids":
        ids = [doc.id for doc in candidates]
        lexical = {hit.id: hit.score for hit in state.store.text_search(query, len(ids), ids=ids)}
    else:
        candidates = _encoded(fine, kind, candidates, state)
    try:
        scores = fine_rank(fine.encode_texts([query]).vectors[0], candidates, lexical=lexical,
                           fusion=RERANK_OPTIONS.fusion, weights=RERANK_OPTIONS.weights, model=fine.encoder.signature,
                           stored_model=state.store.fine_signature() if kind == "ids" else None).final
    except UnusableFineVectors as exc:
        return _page_order(len(documents)), str(exc)
    keys = documents if kind == "ids" else [str(i) for i in range(len(documents))]
    return [scores[key] for key in keys], None


def _stored(state: AppState, ids: list[str], fields: list[str]) -> list[Document]:
    """Stored documents by id (each once), as /v1/search's candidates: an unknown id answers 400."""
    unique = list(dict.fromkeys(ids))
    found = {doc.id: doc for doc in state.store.fetch(unique, vectors=False)}  # the fine stage reads fine vectors
    missing = next((i for i in ids if i not in found), None)
    if missing is not None:
        raise BadRequest(f"field '{fields[ids.index(missing)]}': no document with id {quoted(missing)} in the "
                         f"sidecar's store ({_store_name(state)}); the rerank processor must read the `id` field "
                         "of documents in the sidecar's own index")
    return [found[i] for i in unique]


def _checked_images(state: AppState, images: list[str], fields: list[str]) -> list[tuple[str, bytes]]:
    """Base64 images → [(field, bytes)], each checked as an image whether or not a fine model will
    encode it: base64, format, declared size and the request's pixel total (4xx naming the document)."""
    checked = [(field, image_bytes(image, field=field, max_bytes=state.settings.max_body_bytes))
               for field, image in zip(fields, images)]
    # Headers only: without a fine model nothing encodes the pixels, so decoding them would spend CPU
    # and decode memory on nothing; with one, decode_images reads the headers again (cheap beside the
    # decode), and one check for both paths keeps their 4xx alike.
    open_images(checked, encoding=state.fine_encoding or state.encoding, settings=state.settings)
    return checked


def _encoded(fine: EncodingService, kind: str, documents: list[Any], state: AppState) -> list[Document]:
    """Documents that live only in this request, as candidates of the fine stage: the fine model's
    vector of each text, or of each image (checked bytes) through the fine model's own preprocessing."""
    if kind == "texts":
        vectors = fine.encode_texts(documents).vectors
    else:
        vectors = fine.encode_images(decode_images(documents, encoding=fine, settings=state.settings))
    return [Document(id=str(i), vector=vector, fine_vector=vector) for i, vector in enumerate(vectors)]


def _page_order(n: int) -> list[float]:
    return [1.0 - i / n for i in range(n)]


CANDIDATES: dict[str, Callable[[AppState, list[str], list[str]], Any]] = {
    "ids": _stored, "texts": lambda state, texts, fields: texts, "images": _checked_images}


def _request_body(fields: tuple[str, ...]) -> tuple[AppState, dict[str, Any]]:
    """The app state and the checked JSON body; the model the URL pins must be the one served."""
    state = current_state()
    encoder = state.encoding.encoder
    for name, served in (("model", encoder.name), ("weights", encoder.weights)):
        pinned = request.args.get(name)
        if pinned is not None and pinned != served:
            raise ModelNotFound(f"the URL asks for {name} {quoted(pinned)}, but this sidecar serves "
                                f"{encoder.signature.describe()}: the connector was made for another model; run "
                                "`clip-sidecar opensearch connect` against a sidecar serving the index's model")
    body = json_body(request, state.settings)
    known_fields(body, fields)
    return state, body


def _check_index(state: AppState) -> None:
    pinned = request.args.get("index")
    settings = state.settings
    if pinned is not None and (settings.store != "opensearch" or pinned != settings.opensearch_index):
        raise BadRequest(f"the URL reranks documents of OpenSearch index {quoted(pinned)}, but this sidecar's store is "
                         f"{_store_name(state)}: point the connector at the sidecar of that index")


def _store_name(state: AppState) -> str:
    """The store as these errors name it: by its index, never by its folder or its cluster's URL. The
    error reaches whoever calls with the connector's key (scope embeddings) and, through ml-commons,
    whoever searches with the rerank processor: the server's own layout is none of theirs."""
    settings = state.settings
    if settings.store == "opensearch":
        return f"OpenSearch index {settings.opensearch_index}"
    return "an embedded store"


def _inputs(body: dict[str, Any], *, limit: int | None) -> list[Any]:
    """`input` as ml-commons sends it: a non-empty JSON list (ml-commons never sends a bare string)."""
    if "input" not in body:
        raise BadRequest("field 'input' is required: a list, as ml-commons' OpenAI pre-process sends it")
    inputs = body["input"]
    if not isinstance(inputs, list):
        raise BadRequest(f"field 'input' must be a list, got {json_type(inputs)}")
    if not inputs:
        raise BadRequest("field 'input' is empty: send at least one item")
    if limit is not None and len(inputs) > limit:
        raise PayloadTooLarge(f"field 'input' has {len(inputs)} items, over the limit of {limit} (max_batch_items): "
                              "lower the text_embedding processor's batch_size or the connector's "
                              "input_docs_processed_step_size")
    optional(body, "model", str)
    optional(body, "user", str)
    if body.get("encoding_format", "float") != "float":
        raise BadRequest("field 'encoding_format' must be float here: ml-commons reads vectors as JSON numbers")
    return inputs


def _documents(body: dict[str, Any], *, limit: int, setting: str) -> list[str]:
    if "documents" not in body:
        raise BadRequest("field 'documents' is required: the texts, ids or base64 images to score")
    documents = optional(body, "documents", list)
    if len(documents) > limit:
        raise PayloadTooLarge(f"field 'documents' has {len(documents)} items, over the limit of {limit} ({setting}): "
                              "rerank a smaller page (size)")
    for i, document in enumerate(documents):
        if not isinstance(document, str):
            raise BadRequest(f"field 'documents[{i}]' must be a string, got {json_type(document)}")
    metrics.REQUEST_ITEMS.labels(request.url_rule.rule).observe(len(documents))
    return documents


def _document_image(value: Any, *, field: str, shape: str, state: AppState) -> np.ndarray:
    """The image of a [text or null, image] call → model pixels; what is not an image answers 4xx."""
    if not isinstance(value, str):
        raise BadRequest(f"field '{field}' must be a base64 image, got {json_type(value)}: {shape}")
    try:
        data = image_bytes(value, field=field, max_bytes=state.settings.max_body_bytes)
        return decode_images([(field, data)], encoding=state.encoding, settings=state.settings)[0]
    except (BadRequest, UnsupportedMediaType) as exc:
        # Not an image at all: perhaps two texts sent to the wrong URL; say which one serves them.
        raise type(exc)(f"{exc.message}; {shape} (two texts are a batch for {TEXTS_PATH})") from exc


def _image_format(text: str) -> str | None:
    """The image format a string is the base64 of (plain, MIME-wrapped or a data URL), judged by the
    signature of its first bytes; None for anything else, every real text included (a text is
    base64 over its whole length, in spite of spaces and punctuation, only by rare accident)."""
    if text.startswith("data:image/") and ";base64," in text[:64]:
        return "data URL"
    data = text.translate(_BASE64_SPACING)
    if len(data) < _SNIFF_CHARS or not _BASE64.fullmatch(data):
        return None
    try:
        return sniff_format(base64.b64decode(data[:_SNIFF_CHARS], validate=True))
    except (binascii.Error, ValueError):
        return None
