"""A check for `schemathesis run` (tests/e2e/test_api_fuzz.py): a request the OpenAPI file calls valid is served
(2xx), except where it carries what a schema cannot describe: image bytes (valid base64 need not be a decodable
image: 415), `dimensions` (only the served model's own: 400), a document id (`like`, feedback's `doc_id`: only a
stored one, else 404), a pinned model (only the served one: 404), stored document ids (only those in the store:
400), a `top_n` below the number of documents (400: every document is answered), a prompt set's name the server
does not hold (which names exist is the server's state: 404), a filter on a metadata field no stored document
holds (which fields exist is the store's state: 400) or feedback's filters that exclude its `doc_id` (which
documents match is the store's state: 400), or filters holding more than max_filter_values values in
all (a sum over fields, which a schema cannot bound: 413)."""

from __future__ import annotations

import schemathesis

# Paths whose every request carries images or stored ids.
UNDESCRIBABLE = ("/v1/opensearch/embeddings/text-image", "/v1/opensearch/rerank/images", "/v1/opensearch/rerank/ids")


@schemathesis.check
def schema_valid_requests_are_served(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or case.method.upper() != "POST":
        return None
    body = case.body
    if not isinstance(body, dict) or _carries_images(body, path=case.path) or "dimensions" in body or "like" in body:
        return None
    if response.status_code == 404 and _error(response).get("code") in ("prompt_set_not_found", "document_not_found"):
        return None
    if response.status_code == 400 and "no stored document holds metadata field" in str(_error(response).get("message")):
        return None
    if response.status_code == 400 and "does not let through the judged document" in str(
            _error(response).get("message")):
        return None
    if response.status_code == 413 and "(max_filter_values)" in str(_error(response).get("message")):
        return None
    if case.operation.path in UNDESCRIBABLE or set(case.query or {}) & {"model", "weights", "index"}:
        return None
    if isinstance(body.get("top_n"), int) and isinstance(body.get("documents"), list) \
            and body["top_n"] < len(body["documents"]):
        return None
    if not 200 <= response.status_code < 300:
        raise AssertionError(f"a request the OpenAPI file calls valid answered {response.status_code}: "
                             f"{response.text[:500]}")
    return None


def _carries_images(body: dict, *, path: str) -> bool:
    # /v1/classify takes plain strings as images unless told otherwise; /v1/embeddings as texts.
    default = "image" if path == "/v1/classify" else "text"
    if "image" in body or body.get("modality", default) == "image":
        return True
    items = body.get("input")
    return any(isinstance(item, dict) and "image" in item for item in (items if isinstance(items, list) else [items]))


def _error(response) -> dict:
    """The JSON error's {"code", "message"}, or {} for a body that is not one."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return {}
    return error if isinstance(error, dict) else {}
