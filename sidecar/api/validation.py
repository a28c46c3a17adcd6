"""Request validation: every error names the field and, where there is one, the limit (its setting).

Everything a client sends is checked here before any work is done for it: the body (size, also
when chunked; JSON; nesting; valid Unicode; finite numbers), each field's type and range, the
filters (names and values both stores can take), and images (base64, then their headers: format,
size, resized size, decode memory, the request's pixel total) before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
from flask import Request
from PIL import Image
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from sidecar.config import Settings
from sidecar.errors import ApiError, BadRequest, PayloadTooLarge, UnsupportedMediaType, not_utf8, quoted
from sidecar.model.images import ImageDecodeError
from sidecar.retrieval.calibration import MAX_EF_SEARCH
from sidecar.serving.encoding import EncodingService
from sidecar.stores.base import StoreQueryError, UnknownFilterField

# 64-bit signed integers: what OpenSearch's long and SQLite's INTEGER hold.
INT64 = (-2**63, 2**63 - 1)
_READ_CHUNK = 64 * 1024
_BASE64_SPACING = dict.fromkeys(map(ord, "\t\n\r "))
V = TypeVar("V", bound=Callable[..., Any])
# ECMAScript's \s, which the OpenAPI file's patterns use: a text of only these is blank.
WHITESPACE = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
             "\u2028\u2029\u202f\u205f\u3000\ufeff"


class IdConverter(PathConverter):
    """`<id:name>` in a route: an id as sent, slashes and all. werkzeug's `path` takes no leading "/", so
    "/v1/documents//a/thumbnail" (the id "/a", percent-encoded or not) matched only once slashes were
    merged, and was redirected to the thumbnail of "a", another document."""

    regex = ".+?"
    part_isolating = False  # an id spans path segments (werkzeug infers True from a regex without "/")


def body_too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes (max_body_bytes)")


def json_body(request: Request, settings: Settings) -> dict[str, Any]:
    """The request's JSON object, or a 4xx naming what is wrong with it."""
    if not request.is_json:
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {quoted(request.mimetype or 'none')}")
    if request.content_encoding and request.content_encoding.lower() != "identity":
        # Nothing here decompresses: a gzip body would read as bytes that are not UTF-8, another as its raw bytes.
        raise UnsupportedMediaType(f"Content-Encoding {quoted(request.content_encoding)} is not accepted: send the body "
                                   "uncompressed")
    data = _read_body(request, max_bytes=settings.max_body_bytes)
    try:
        body = json.loads(data)
    except RecursionError as exc:  # the parser's own guard, far deeper than max_json_depth
        raise BadRequest(f"request body nests deeper than {settings.max_json_depth} levels (max_json_depth)") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is {not_utf8(exc)}: JSON is sent as UTF-8") from exc
    except ValueError as exc:
        # Python's own limit on an integer's digits, whose message advises the server's code
        # (sys.set_int_max_str_digits); no field takes a number a fraction of that long.
        raise BadRequest(f"request body holds an integer of more than {sys.get_int_max_str_digits()} digits; "
                         "no field takes one that long") from exc
    check_json_values(body, max_depth=settings.max_json_depth)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {json_type(body)}")
    return body


def _read_body(request: Request, *, max_bytes: int) -> bytes:
    """The body, never reading more than max_bytes + 1 of it. A Content-Length over the limit is
    refused before reading (werkzeug, 413). A chunked body has no length: werkzeug would cut it at
    the limit and serve the rest silently, so it is read here from the server's (de-chunked) input
    until its end or one byte past the limit."""
    environ = request.environ
    try:
        if request.content_length is None and environ.get("wsgi.input_terminated"):
            stream, data = environ["wsgi.input"], bytearray()
            while len(data) <= max_bytes:
                chunk = stream.read(min(_READ_CHUNK, max_bytes + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
            if len(data) > max_bytes:
                raise body_too_large(max_bytes)
            return bytes(data)
        return request.get_data(cache=False)
    except (ApiError, HTTPException):
        raise
    except Exception as exc:  # noqa: BLE001 - the server's own errors for bad framing (gunicorn: InvalidChunkSize)
        raise BadRequest(f"request body could not be read: {type(exc).__name__}: {exc}") from exc


def check_json_values(body: Any, *, max_depth: int) -> None:
    """What Python's JSON parser lets through and nothing downstream can use: nesting deeper than
    max_depth, NaN/Infinity (not JSON, though the parser takes them; 1e999 becomes inf), and lone
    surrogates ("\\ud800": not Unicode, cannot be encoded for the tokenizer, SQLite or OpenSearch)."""
    # Depth first, one entry per container being walked (its path, whether it is an object, an iterator
    # over its children): the walk holds at most max_depth entries, whatever the number of values, and
    # makes a value's path only to name it in an error. An entry with a path for every value held
    # 520 MiB for an 8 MB list of zeros (2 GiB at max_body_bytes) before max_batch_items refused it.
    walk: list[tuple[str, bool, Iterator[tuple[Any, Any]]]] = []
    _open_or_check(body, "", walk, max_depth)
    while walk:
        path, is_object, children = walk[-1]
        for key, child in children:
            if is_object and not _is_unicode(key):
                raise BadRequest(f"field {quoted(path or 'body')} has a key with a lone surrogate ({quoted(key)}): "
                                 "send valid Unicode")
            if isinstance(child, (dict, list)) or _scalar_problem(child):
                child_path = (f"{path}.{key}" if path else key) if is_object else f"{path}[{key}]"
                _open_or_check(child, child_path, walk, max_depth)  # a scalar's problem raises here
                break  # a container's values before its siblings'
        else:
            walk.pop()


def _open_or_check(value: Any, path: str, walk: list, max_depth: int) -> None:
    """A container joins the walk (its depth checked); a scalar is checked."""
    if isinstance(value, (dict, list)):
        _check_depth(path, len(walk) + 1, max_depth)
        walk.append((path, isinstance(value, dict), iter(value.items()) if isinstance(value, dict) else enumerate(value)))
        return
    problem = _scalar_problem(value)
    if problem:
        raise BadRequest(f"field {quoted(path)} {problem}")


def _scalar_problem(value: Any) -> str | None:
    if isinstance(value, str) and not _is_unicode(value):
        return "holds a lone surrogate (an unpaired \\ud800-\\udfff escape): send valid Unicode"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value}: JSON numbers are finite"
    return None


def _check_depth(path: str, depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise BadRequest(f"field {quoted(path)} nests deeper than {max_depth} levels (max_json_depth)")


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def query_parameters(*names: str) -> Callable[[V], V]:
    """Declares the query parameters a view reads; check_query_string refuses any other, on every route."""
    def declare(view: V) -> V:
        view.query_parameters = names  # type: ignore[attr-defined]
        return view
    return declare


def any_query_string(view: V) -> V:
    """Declares a view that reads no query string and answers whatever one it is sent: the search page, whose
    links pick up parameters on their way through mail, chat and trackers (?utm_source=…, ?fbclid=…), where a
    JSON 400 would greet a person instead of the page."""
    view.query_parameters = None  # type: ignore[attr-defined]
    return view


def check_query_string(args: MultiDict[str, str], names: tuple[str, ...]) -> None:
    """The query string holds only the view's parameters, each once: a repeated one is not read as its first
    (`?size=1&size=2` answered one value a facet) and an unknown one is not ignored (a typo would be)."""
    for name in args:
        if name not in names:
            takes = f"it takes {', '.join(names)}" if names else "this path takes none"
            raise BadRequest(f"unknown query parameter {quoted(name)}; {takes}")
        if len(values := args.getlist(name)) > 1:
            raise BadRequest(f"query parameter {quoted(name)} is given {len(values)} times: send it once")


def known_fields(body: dict, fields: tuple[str, ...], *, where: str = "request body") -> None:
    unknown = [name for name in body if name not in fields]
    if unknown:
        raise BadRequest(f"unknown field {quoted(unknown[0])} in the {where}; it takes {', '.join(fields)}")


def optional(body: dict, field: str, kind: type | tuple[type, ...], default: Any = None, *,
             name: str | None = None) -> Any:
    """body[field] if present (null is not a value of any field), else `default`; `name` is the
    field's full path in errors."""
    if field not in body:
        return default
    value = body[field]
    kinds = _as_tuple(kind)
    if int in kinds and float not in kinds and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 10.0 is the integer 10, as JSON Schema counts
    # bool is an int in Python; a JSON true is not a count.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise BadRequest(f"field '{name or field}' must be {_type_names(kind)}, got {json_type(value)}")
    return value


def is_blank(text: str) -> bool:
    return not text.strip(WHITESPACE)


def query_text(body: dict, settings: Settings, *, field: str = "text") -> str | None:
    """A query's text (field 'text', or the rerank endpoints' 'query'), as searched: its first max_text_chars
    characters (as every text is cut before tokenising), None where absent or blank. Every endpoint ranking by a
    client's query reads it here, so the model, BM25 and the logs all see one text, and the text a client sends
    back with its feedback is the text its search ranked by and logged."""
    text = optional(body, field, str)
    if text is None:
        return None
    text = text[:settings.max_text_chars]
    return None if is_blank(text) else text


def bounded_int(body: dict, field: str, *, default: int, low: int, high: int, setting: str | None = None) -> int:
    """body[field], an integer from low to high; `setting` names where `high` comes from (e.g. "max_k"), so
    the error tells a client which setting to raise. Absent, it is `default`, at most `high`: a server whose limit
    is under an endpoint's default (max_k=3, k 10 by default) has nothing of the client's to refuse."""
    if field not in body:
        return min(default, high)
    value = optional(body, field, int)
    if not low <= value <= high:
        limit = f"{high} ({setting})" if setting else f"{high}"
        raise BadRequest(f"field '{field}' must be between {low} and {limit}, got {value}")
    return value


def ef_search_field(body: dict) -> int | None:
    """Field 'ef_search', the HNSW breadth of one query; None where it is absent (the store's setting)."""
    if "ef_search" not in body:
        return None
    return bounded_int(body, "ef_search", default=0, low=1, high=MAX_EF_SEARCH)


def choice(body: dict, field: str, *, choices: tuple[str, ...], default: str, name: str | None = None) -> str:
    value = optional(body, field, str, default, name=name)
    if value not in choices:
        raise BadRequest(f"field '{name or field}' must be one of {', '.join(choices)}, got {quoted(value)}")
    return value


def filters(body: dict, settings: Settings) -> dict[str, Any] | None:
    """Metadata filters {field: value | [values]}, held to what both stores can run: a non-empty field name
    without control characters, scalar values with integers in 64 bits, at most max_filter_fields fields and
    max_filter_values values."""
    value = optional(body, "filters", dict)
    if not value:
        return None
    if len(value) > settings.max_filter_fields:
        raise PayloadTooLarge(f"field 'filters' has {len(value)} fields, over the limit of "
                              f"{settings.max_filter_fields} (max_filter_fields)")
    total = 0
    for name, wanted in value.items():
        if not name or any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise BadRequest(f"field 'filters' has a key {quoted(name)}: a metadata field name is non-empty, without "
                             "control characters")
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values:
            raise BadRequest(f"field {quoted(f'filters.{name}')} is an empty list: send at least one value")
        total += len(values)
        if total > settings.max_filter_values:
            raise PayloadTooLarge(f"field 'filters' has more than {settings.max_filter_values} values "
                                  "(max_filter_values)")
        for i, item in enumerate(values):
            field = f"filters.{name}[{i}]" if isinstance(wanted, list) else f"filters.{name}"
            if not isinstance(item, (str, int, float)):  # bool is an int
                raise BadRequest(f"field {quoted(field)} must be a string, number or boolean, got {json_type(item)}")
            # JSON Schema's integers are whole numbers however written (2.0, 1e300): held to 64 bits alike.
            whole = isinstance(item, int) or isinstance(item, float) and item.is_integer()
            if whole and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
                raise BadRequest(f"field {quoted(field)} is {item}, outside the 64-bit integers the stores hold "
                                 f"({INT64[0]} to {INT64[1]})")
    return value


@contextmanager
def filter_errors(wanted: Any) -> Iterator[None]:
    """A query the store refuses because of the request's filters (a word for a numeric field, a field no
    document holds) is the request's error, 400 naming `filters`; without filters it is the store's own error."""
    try:
        yield
    except UnknownFilterField as exc:
        raise BadRequest(f"field 'filters': {exc}") from exc
    except StoreQueryError as exc:
        if not wanted:
            raise  # a query the sidecar built alone: the store's error, not the request's
        raise BadRequest(f"field 'filters' does not fit the types of the stored metadata: {exc}") from exc


def image_bytes(value: Any, *, field: str, max_bytes: int) -> bytes:
    """A base64 image field → its bytes. Takes a data URL (data:image/png;base64,...) and MIME-wrapped
    base64 (76-column lines, as `base64` prints it)."""
    if not isinstance(value, str):
        raise BadRequest(f"field '{field}' must be a base64 string, got {json_type(value)}")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise BadRequest(f"field '{field}' is a data URL without ';base64': only base64 data URLs are accepted")
    if len(value) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"field '{field}': image is over the limit of {max_bytes} bytes (max_body_bytes)")
    # Line breaks and spaces are not data (RFC 2045 wraps at 76 columns); anything else outside
    # the alphabet is an error rather than silently dropped.
    value = value.translate(_BASE64_SPACING)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"field '{field}' is not valid base64: {exc}") from exc
    if not data:
        raise BadRequest(f"field '{field}' is empty")
    return data


def decode_images(images: list[tuple[str, bytes]], *, encoding: EncodingService, settings: Settings) -> list[np.ndarray]:
    """[(field, bytes)] → model pixels. Every header is read and every limit checked (the request's
    pixel total, max_request_pixels, included) before the first pixel is decoded."""
    pixels = []
    for field, image in open_images(images, encoding=encoding, settings=settings):
        with _image_errors(field):
            pixels.append(encoding.decode_image(image))
    return pixels


def open_images(images: list[tuple[str, bytes]], *, encoding: EncodingService,
                settings: Settings) -> list[tuple[str, Image.Image]]:
    """[(field, bytes)] → [(field, opened image)], headers only: the format, each image's limits and
    the request's pixel total (max_request_pixels) are checked, no pixel is decoded."""
    opened = []
    total = 0
    for field, data in images:
        with _image_errors(field):
            image = encoding.open_image(data)
        total += image.width * image.height
        if total > settings.max_request_pixels:
            raise PayloadTooLarge(f"field '{field}': the request's images hold {total} pixels up to this one, "
                                  f"over the limit of {settings.max_request_pixels} (max_request_pixels)")
        opened.append((field, image))
    return opened


@contextmanager
def _image_errors(field: str) -> Iterator[None]:
    """A limit → 413; bytes no allowed decoder takes (not an image, a refused format, a decoder
    failure) → 415."""
    try:
        yield
    except ImageDecodeError as exc:
        error = PayloadTooLarge if exc.kind == "too_large" else UnsupportedMediaType
        raise error(f"field '{field}': {exc.reason}") from exc


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def json_type(value: Any) -> str:
    """What the client sent, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
