"""Errors the API answers, each with its HTTP status and a stable code."""

from __future__ import annotations


class UserFixable(Exception):
    """An error whose message says what the user fixes (a setting, a corpus or shard file, a prompt set, a model
    not cached, a store of another model or out of reach), not a bug: every command (`cli/root.py`) and gunicorn's
    boot (`api/wsgi.py`) say it in one line, where anything else is a traceback."""


class ApiError(Exception):
    """An error the API answers as JSON {"error": {"code", "message"}} with `status`."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, retry_after_s: float | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}  # sent with the answer beside Retry-After (WWW-Authenticate on a 401)


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    """No API key, or one that matches none of the configured keys (revoked or mistyped)."""

    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    """A valid API key whose scopes do not include the endpoint; without keys, a request addressed to a
    Host the open API does not answer (sidecar/api/auth.py host_guard)."""

    status, code = 403, "forbidden"


class RateLimited(ApiError):
    """A key's request rate is over its limit: retry after Retry-After seconds."""

    status, code = 429, "rate_limited"


class ModelNotFound(ApiError):
    status, code = 404, "model_not_found"


class NotEnabled(ApiError):
    """An endpoint whose feature this server was not configured for; the message names the setting."""

    status, code = 404, "not_enabled"


class DocumentNotFound(ApiError):
    status, code = 404, "document_not_found"


class PromptSetMissing(ApiError):
    status, code = 404, "prompt_set_not_found"


class ModelMismatch(ApiError):
    """The store holds vectors of another model than the one this server encodes queries with (another
    model's `index` claimed or rebuilt it while serving): an operator's matter, retrying does not help."""

    status, code = 409, "model_mismatch"


class PromptSetUnusable(ApiError):
    """A stored prompt set this server's version cannot use (saved by a newer version, edited by hand): like
    a model mismatch, the request is fine and retrying does not help; an operator's matter."""

    status, code = 409, "prompt_set_unusable"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Overloaded(ApiError):
    status, code = 503, "overloaded"


class EncodeTimeout(ApiError):
    status, code = 504, "timeout"


class NotReady(ApiError):
    status, code = 503, "not_ready"


class LogUnwritable(ApiError):
    """A quality log cannot take a record (a full or read-only disk): nothing was recorded."""

    status, code = 503, "log_unwritable"


class StoreUnreachable(ApiError):
    """The store cannot answer now (cluster down, timing out, rejecting under load): retry later."""

    status, code = 503, "store_unavailable"


class StoreFailed(ApiError):
    """The store answered with an error that retrying will not change (a missing index, say)."""

    status, code = 502, "store_error"


def not_utf8(exc: UnicodeDecodeError) -> str:
    """A file that does not decode as UTF-8, said the one way every reader of user files says it
    (after the file's name): the first bad byte and where it is."""
    return f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"


# An id, name or value a client sent, as an error message shows it: enough to recognise it. A body field
# has no length limit but max_body_bytes: a 70,000-character `like` id came back whole in its 404.
MAX_ECHOED_CHARS = 200


def quoted(value: str) -> str:
    """A client's string, quoted as repr() does, its first MAX_ECHOED_CHARS characters where it is longer
    (saying so, with its length)."""
    if len(value) <= MAX_ECHOED_CHARS:
        return repr(value)
    return f"{value[:MAX_ECHOED_CHARS]!r} (the first {MAX_ECHOED_CHARS} of its {len(value)} characters)"
