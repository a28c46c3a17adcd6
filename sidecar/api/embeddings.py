"""The OpenAI-compatible surface: POST /v1/embeddings (extended with images) and GET /v1/models."""

from __future__ import annotations

import base64
from typing import Any, Sequence

import numpy as np
from flask import Blueprint, jsonify, request

from sidecar.api.state import current_state
from sidecar.api.validation import (
    choice,
    decode_images,
    image_bytes,
    json_body,
    json_type,
    known_fields,
    optional,
)
from sidecar.errors import BadRequest, ModelNotFound, PayloadTooLarge, quoted
from sidecar.model.encoder import Encoder
from sidecar.serving import metrics

bp = Blueprint("embeddings", __name__)

# `model` and `user` are OpenAI's: taken and ignored (the served model answers, and names itself).
FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "modality")
ITEM_KINDS = ("text", "image")


@bp.post("/v1/embeddings")
def create_embeddings():
    state = current_state()
    settings = state.settings
    encoder = state.encoding.encoder
    body = json_body(request, settings)
    known_fields(body, FIELDS)
    optional(body, "model", str)
    optional(body, "user", str)
    dimensions = optional(body, "dimensions", int)
    if dimensions is not None and dimensions != encoder.dim:
        raise BadRequest(f"field 'dimensions' is {dimensions}, but {encoder.name} vectors have {encoder.dim}: CLIP "
                         "vectors are not Matryoshka embeddings, a shortened one means nothing; omit the field or "
                         f"send {encoder.dim}")
    modality = choice(body, "modality", choices=ITEM_KINDS, default="text")
    encoding_format = choice(body, "encoding_format", choices=("float", "base64"), default="float")
    items = input_items(body, modality=modality, limit=settings.max_batch_items)
    metrics.REQUEST_ITEMS.labels("/v1/embeddings").observe(len(items))

    texts = [(i, value) for i, (kind, value) in enumerate(items) if kind == "text"]
    images = [(i, image_bytes(value, field=f"input[{i}]", max_bytes=settings.max_body_bytes))
              for i, (kind, value) in enumerate(items) if kind == "image"]
    pixels = decode_images([(f"input[{i}]", data) for i, data in images], encoding=state.encoding,
                           settings=settings)
    vectors: list[Any] = [None] * len(items)
    truncated: list[int] = []
    tokens = 0
    if texts:
        encoded = state.encoding.encode_texts([t for _, t in texts])
        for (i, _), vector in zip(texts, encoded.vectors):
            vectors[i] = vector
        truncated = [texts[j][0] for j in encoded.truncated]
        tokens = encoded.tokens
    if images:
        for (i, _), vector in zip(images, state.encoding.encode_images(pixels)):
            vectors[i] = vector

    return jsonify(embeddings_body(vectors, encoder=encoder, encoding_format=encoding_format, truncated=truncated,
                                   tokens=tokens))


@bp.get("/v1/models")
def list_models():
    """The served model, in OpenAI's list shape (what `client.models.list()` reads)."""
    return jsonify({"object": "list", "data": [_model_entry()]})


@bp.get("/v1/models/<id:model>")
def retrieve_model(model: str):
    entry = _model_entry()
    if model != entry["id"]:
        raise ModelNotFound(f"model {quoted(model)} is not served here; this server serves {entry['id']!r}")
    return jsonify(entry)


def _model_entry() -> dict[str, Any]:
    state = current_state()
    encoder = state.encoding.encoder
    return {"id": encoder.name, "object": "model", "created": state.started, "owned_by": "clip-sidecar",
            "weights": encoder.weights, "dimensions": encoder.dim}


def embeddings_body(vectors: Sequence[np.ndarray], *, encoder: Encoder, encoding_format: str = "float",
                    truncated: Sequence[int] = (), tokens: int = 0) -> dict[str, Any]:
    """OpenAI's embeddings answer: one `data` entry per vector, in input order (the order the
    OpenAI clients and ml-commons' post-process read; they ignore `index`)."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": encoder.name,
        "weights": encoder.weights,
        "dimensions": encoder.dim,
        "truncated": list(truncated),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """"float": a JSON list. "base64": little-endian float32 bytes, as OpenAI's API sends them —
    a fraction of the size, and no per-number formatting on either side."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def input_items(body: dict, *, modality: str, limit: int) -> list[tuple[str, Any]]:
    """Normalise `input` to [(kind, value)]: a string, a list of strings (all of `modality`), or a list
    of objects {"text": ...} / {"image": base64}, each with an optional "type" that must agree."""
    if "input" not in body:
        raise BadRequest("field 'input' is required: a string, a list of strings, or a list of "
                         "{\"type\": \"text\"|\"image\", ...} objects")
    raw = body["input"]
    bare = isinstance(raw, str)
    raw = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(raw, list):
        raise BadRequest(f"field 'input' must be a string or a list, got {json_type(raw)}")
    if not raw:
        raise BadRequest("field 'input' is empty: send at least one item")
    if len(raw) > limit:
        raise PayloadTooLarge(f"field 'input' has {len(raw)} items, over the limit of {limit} (max_batch_items)")
    items = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            items.append((modality, item))
        elif isinstance(item, dict):
            items.append(_typed_item(item, field=f"input[{i}]"))
        else:
            raise BadRequest(f"field 'input[{i}]' must be a string or an object, got {json_type(item)}")
        kind, value = items[-1]
        if value == "":
            # Refused as OpenAI's API refuses it: an empty text would get the vector of the model's start and
            # end tokens alone, the same for every empty input, and near nothing a client meant.
            field = f"input[{i}].{kind}" if isinstance(item, dict) else "input" if bare else f"input[{i}]"
            raise BadRequest(f"field '{field}' is an empty string: each input must be non-empty")
    return items


def _typed_item(item: dict, *, field: str) -> tuple[str, str]:
    """{"text": ...} or {"image": ...}; a "type", where given, must name the field the item carries."""
    known_fields(item, ("type", *ITEM_KINDS), where=f"object {field}")
    present = [kind for kind in ITEM_KINDS if kind in item]
    if len(present) > 1:
        raise BadRequest(f"field '{field}' carries both 'text' and 'image': an item is one or the other")
    if "type" in item:
        kind = choice(item, "type", choices=ITEM_KINDS, default="text", name=f"{field}.type")
        if present != [kind]:
            raise BadRequest(f"field '{field}.{kind}' is required for an item of type {kind}")
    elif present:
        kind = present[0]
    else:
        raise BadRequest(f"field '{field}' must carry 'text' or 'image'")
    return kind, optional(item, kind, str, name=f"{field}.{kind}")
