"""The search page at `/`: plain HTML, JavaScript and CSS committed under sidecar/api/static (no build
step, no fonts or scripts from elsewhere), served from a fixed list of files — no path a request
names is ever opened. The page calls the API like any client (/v1/search, /v1/captions, /v1/facets,
thumbnails by document id), sending the API key a user enters as a Bearer token."""

from __future__ import annotations

import hashlib
from importlib.resources import files

from flask import Blueprint, Response, abort, request

from sidecar.api.validation import any_query_string
from sidecar.errors import quoted

bp = Blueprint("page", __name__)

# name → media type: everything the page loads from the server besides the API. The icon named by the page
# keeps browsers from asking for /favicon.ico, a 404 in the server's log at every page load.
ASSETS = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css",
          "favicon.svg": "image/svg+xml"}
# The page reaches this server only, and the browser is told so: nothing else may load, even if a
# stored caption carried markup (the page writes text, never HTML, anyway). blob: is the preview
# of a chosen image and the thumbnails (fetched: with the API key, and given up on if they hang).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
# What the page's routes answer: open without an API key (the page holds no data; every API call it
# makes sends the key a user types into it).
PUBLIC_PATHS = ("/", *(f"/static/{name}" for name in ASSETS if name != "index.html"))
_CONTENT = {name: (files("sidecar.api") / "static" / name).read_bytes() for name in ASSETS}


@bp.get("/")
@any_query_string
def index():
    return _asset("index.html")


@bp.get("/static/<name>")
def static_asset(name: str):
    if name not in ASSETS or name == "index.html":
        abort(404, f"no page asset {quoted(name)}; the page is at /")
    return _asset(name)


def _asset(name: str) -> Response:
    data = _CONTENT[name]
    response = Response(data, mimetype=ASSETS[name])
    response.set_etag(hashlib.sha256(data).hexdigest()[:32])
    response.headers["Cache-Control"] = "no-cache"  # revalidated by ETag: an upgraded server serves its own page
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response.make_conditional(request)
