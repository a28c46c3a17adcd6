"""POST /v1/embeddings: the OpenAI embeddings shape, extended with images (base64) per item."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from flask import Blueprint, jsonify, request

from sidecar.api.state import current_state
from sidecar.api.validation import choice, image_pixels, json_body, optional
from sidecar.errors import BadRequest, PayloadTooLarge

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
def create_embeddings():
    state = current_state()
    settings = state.settings
    body = json_body(request)
    modality = choice(body, "modality", choices=("text", "image"), default="text")
    encoding_format = choice(body, "encoding_format", choices=("float", "base64"), default="float")
    items = _items(body, modality=modality, limit=settings.max_batch_items)

    texts = [(i, value) for i, (kind, value) in enumerate(items) if kind == "text"]
    images = [(i, image_pixels(value, field=f"input[{i}]", encoding=state.encoding, max_bytes=settings.max_body_bytes))
              for i, (kind, value) in enumerate(items) if kind == "image"]
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
        for (i, _), vector in zip(images, state.encoding.encode_images([pixels for _, pixels in images])):
            vectors[i] = vector

    encoder = state.encoding.encoder
    return jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": encoder.name,
        "weights": encoder.weights,
        "dimensions": encoder.dim,
        "truncated": truncated,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """"float": a JSON list. "base64": little-endian float32 bytes, as OpenAI's API sends them —
    a fraction of the size, and no per-number formatting on either side."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def _items(body: dict, *, modality: str, limit: int) -> list[tuple[str, Any]]:
    """Normalise `input` to [(kind, value)]: a string, a list of strings (all of `modality`), or
    a list of objects {"type": "text", "text": ...} / {"type": "image", "image": base64}."""
    if "input" not in body:
        raise BadRequest("field 'input' is required: a string, a list of strings, or a list of "
                         "{\"type\": \"text\"|\"image\", ...} objects")
    raw = body["input"]
    raw = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(raw, list):
        raise BadRequest(f"field 'input' must be a string or a list, got {type(raw).__name__}")
    if not raw:
        raise BadRequest("field 'input' is empty: send at least one item")
    if len(raw) > limit:
        raise PayloadTooLarge(f"field 'input' has {len(raw)} items, over the limit of {limit} (max_batch_items)")
    items = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            items.append((modality, item))
        elif isinstance(item, dict):
            kind = choice(item, "type", choices=("text", "image"), default=modality)
            value = item.get(kind)
            if value is None:
                raise BadRequest(f"field 'input[{i}].{kind}' is required for an item of type {kind}")
            items.append((kind, optional(item, kind, str)))
        else:
            raise BadRequest(f"field 'input[{i}]' must be a string or an object, got {type(item).__name__}")
    return items
