"""Flask's JSON responses written by orjson.

A 512-d vector in the `float` encoding — what OpenSearch's ml-commons connectors ask for — took the
standard library 293 µs to write through Flask's provider, about a third of a request's whole cost
at the HTTP floor; orjson writes the same text in 18 µs (bench/RESULTS.md). The values are the same: floats as the
shortest text that reads back to the same number, keys in insertion order, the same newline.
What orjson does not write itself goes through Flask's own `default`, and anything it refuses (a
lone surrogate in a string) falls back to the standard library, so no response changes meaning."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response
from flask.json.provider import DefaultJSONProvider

# Dates and dataclasses through Flask's `default` (HTTP dates, as before), not orjson's own forms.
_OPTIONS = (orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
            | orjson.OPT_PASSTHROUGH_DATACLASS)


class OrjsonProvider(DefaultJSONProvider):
    sort_keys = False  # insertion order: the order the handlers build their answers in

    def response(self, *args: Any, **kwargs: Any) -> Response:
        if (self.compact is None and self._app.debug) or self.compact is False:
            return super().response(*args, **kwargs)  # indented, for people reading it
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj, default=self.default, option=_OPTIONS)
        except orjson.JSONEncodeError:
            return super().response(*args, **kwargs)
        return self._app.response_class(body, mimetype=self.mimetype)
