"""Request-body validation: every error names the field and, where there is one, the limit."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from flask import Request

from sidecar.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from sidecar.model.images import ImageDecodeError
from sidecar.serving.encoding import EncodingService


def json_body(request: Request) -> dict[str, Any]:
    if not request.is_json:
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {request.mimetype or 'none'!r}")
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("request body is not valid JSON")
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def optional(body: dict, field: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(field, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is not a count.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise BadRequest(f"field '{field}' must be {_type_names(kind)}, got {type(value).__name__}")
    return value


def bounded_int(body: dict, field: str, *, default: int, low: int, high: int) -> int:
    value = optional(body, field, int, default)
    if not low <= value <= high:
        raise BadRequest(f"field '{field}' must be between {low} and {high}, got {value}")
    return value


def choice(body: dict, field: str, *, choices: tuple[str, ...], default: str) -> str:
    value = optional(body, field, str, default)
    if value not in choices:
        raise BadRequest(f"field '{field}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def image_pixels(value: Any, *, field: str, encoding: EncodingService, max_bytes: int) -> np.ndarray:
    """A base64 (or data URL) image field → the model's input pixels; errors name the field."""
    if not isinstance(value, str):
        raise BadRequest(f"field '{field}' must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]  # data URL: data:image/png;base64,....
    if len(value) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"field '{field}': image is over the limit of {max_bytes} bytes (max_body_bytes)")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"field '{field}' is not valid base64: {exc}") from exc
    if not data:
        raise BadRequest(f"field '{field}' is empty")
    try:
        return encoding.decode_image(data)
    except ImageDecodeError as exc:
        error = {"format": UnsupportedMediaType, "too_large": PayloadTooLarge}.get(exc.kind, BadRequest)
        raise error(f"field '{field}': {exc.reason}") from exc


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
