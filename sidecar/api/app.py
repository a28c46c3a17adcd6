"""Flask application factory: loads the encoder and store once, registers blueprints and JSON errors."""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from sidecar.api import (
    auth,
    captions,
    classify,
    documents,
    embeddings,
    feedback,
    opensearch_native,
    ops,
    page,
    search,
    status,
)
from sidecar.api.json_provider import OrjsonProvider
from sidecar.api.quality import build_quality
from sidecar.api.state import AppState, attach_state
from sidecar.api.validation import IdConverter, body_too_large, check_query_string
from sidecar.config import Settings
from sidecar.errors import ApiError, ModelMismatch, StoreFailed, StoreUnreachable, quoted
from sidecar.model.encoder import Encoder, load_encoder, load_fine_encoder
from sidecar.model.prompts import PromptSetRegistry
from sidecar.serving import metrics
from sidecar.serving.encoding import EncodingService
from sidecar.stores import open_store
from sidecar.stores.base import QueryModelMismatch, Store, StoreError, StoreUnavailable, check_query_model

log = logging.getLogger(__name__)

# Retry-After for a store that cannot be reached: a cluster that is down or restarting comes back
# in seconds, not milliseconds; clients back off from there.
STORE_RETRY_AFTER_S = 5


class SidecarFlask(Flask):
    def make_default_options_response(self) -> Response:
        """OPTIONS on a path: 204, no body, the methods it takes in Allow (RFC 9110). Flask's own answered 200
        with an empty body labelled text/html. No CORS headers: the API serves its own page (same origin) and
        programs; a page of another origin gets no access to it (see auth.host_guard)."""
        response = super().make_default_options_response()
        response.status_code = 204
        del response.headers["Content-Type"]
        return response


def create_app(settings: Settings | None = None, *, encoder: Encoder | None = None,
               store: Store | None = None, fine_encoder: Encoder | None = None) -> Flask:
    """Build the app. Tests pass Settings (and may pass a loaded encoder/store/fine encoder to share them)."""
    settings = settings or Settings.from_env()
    # No Flask static route: the page's three files are served by name (api/page.py), nothing else on disk.
    app = SidecarFlask(__name__, static_folder=None)
    app.json = OrjsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # Before auth's hooks (Flask runs before_request hooks in the order registered): a request the key or host
    # check refuses (401, 403, 429) is timed too, from its start, not from a clock that never started.
    _register_request_metrics(app)
    # A malformed SIDECAR_API_KEYS fails before the models load. The page's own files hold no data
    # and must load before anyone can type a key into it.
    auth.init_app(app, settings, public_paths=page.PUBLIC_PATHS)
    # The server loads cached models only: downloading or training inside a gunicorn worker
    # would outlast its boot timeout (`clip-sidecar models fetch` is the step that fetches).
    encoder = encoder or load_encoder(settings, fetch=False)
    fine_encoder = fine_encoder or load_fine_encoder(settings, fetch=False)
    store = store or open_store(settings)
    _check_store_model(store, encoder)
    encoding = EncodingService(encoder, settings)
    # Its own role: the fine model's batchers and cache count under model="fine" in /metrics. One decode
    # memory budget for the worker: decode_memory_bytes bounds all of its decodes, for either model.
    fine_encoding = (EncodingService(fine_encoder, settings, role="fine", decode_memory=encoding.decode_memory)
                     if fine_encoder else None)
    attach_state(app, AppState(settings=settings, encoding=encoding,
                               store=store, started=int(time.time()),
                               prompt_sets=PromptSetRegistry(settings.prompt_sets_dir),
                               fine_encoding=fine_encoding,
                               quality=build_quality(settings, store)))
    app.url_map.converters["id"] = IdConverter  # before the blueprints: their routes use it
    # Before the blueprints too (each rule takes the map's value when added): werkzeug merges "//" and
    # answers a 308 with an HTML body ("//healthz" to the host "healthz"); a path is matched as sent.
    app.url_map.merge_slashes = False
    for blueprint in (embeddings.bp, search.bp, captions.bp, classify.bp, documents.bp, opensearch_native.bp, ops.bp,
                      page.bp, status.bp, feedback.bp):
        app.register_blueprint(blueprint)
    _register_query_check(app)
    _register_errors(app, settings)
    _register_store_version(app, store)
    return app


def _register_query_check(app: Flask) -> None:
    """Every route's query string, checked against the parameters its view declares (none unless it uses
    validation.query_parameters; any for validation.any_query_string): after the key check, before any work
    for the request."""

    @app.before_request
    def check_query():
        if request.url_rule is None:  # the routing error (404, 405) answers
            return
        names = getattr(app.view_functions[request.endpoint], "query_parameters", ())
        if names is not None:
            check_query_string(request.args, names)


def _register_store_version(app: Flask, store: Store) -> None:
    """Each request's store calls (a hybrid search's vector and BM25 lists, the fetch of its hits) answer from
    one version of the store: a rebuild switching between two of them mixed its old and new contents. The
    version is the one current at the request's first store call (a request without any reads none)."""

    @app.before_request
    def pin_store_version():
        g.store_version = pinned = store.one_version()
        pinned.__enter__()

    @app.teardown_request
    def release_store_version(exc: BaseException | None):
        pinned = g.pop("store_version", None)
        if pinned is not None:
            pinned.__exit__(None, None, None)


def _check_store_model(store: Store, encoder: Encoder) -> None:
    """Before anything starts: a worker whose queries the store's vectors cannot answer must not boot
    (sidecar.api.wsgi turns this error into gunicorn's one-line "App failed to load"). A store that cannot
    say now (a cluster still starting) is left to /readyz and to each vector search, which check again."""
    try:
        check_query_model(store, encoder.signature)
    except QueryModelMismatch:
        raise
    except StoreError as exc:
        log.warning("could not read the model the store records (%s): each vector search checks it", exc)


def _register_errors(app: Flask, settings: Settings) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        response = jsonify({"error": {"code": exc.code, "message": exc.message}})
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        response.headers.update(exc.headers)
        return response, exc.status

    @app.errorhandler(StoreError)
    def store_error(exc: StoreError):
        if isinstance(exc, StoreUnavailable):
            log.warning("%s %s: %s", request.method, request.path, exc)
            return api_error(StoreUnreachable(f"{exc}; retry later", retry_after_s=STORE_RETRY_AFTER_S))
        log.error("%s %s: %s", request.method, request.path, exc)
        if isinstance(exc, QueryModelMismatch):
            return api_error(ModelMismatch(str(exc)))
        return api_error(StoreFailed(str(exc)))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            return api_error(body_too_large(settings.max_body_bytes))
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        if exc.code == 404 and exc is request.routing_exception:
            message = f"no route for {quoted(request.path)}: the paths are in /openapi.yaml"
        response = jsonify({"error": {"code": code, "message": message}})
        # werkzeug's own headers for the error: Allow on 405 (RFC 9110 requires it).
        response.headers.extend((name, value) for name, value in exc.get_headers() if name.lower() != "content-type")
        return response, exc.code

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": {"code": "internal", "message": f"internal error: {type(exc).__name__}"}}), 500


def _register_request_metrics(app: Flask) -> None:
    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def record(response):
        endpoint = _route_pattern(app)
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - g.started)
        return response


def _route_pattern(app: Flask) -> str:
    """The route a request counts under: its rule's pattern; the path's route for a method it does not take
    (405: routing matched no rule, though the path has one); "unmatched" for a path of no route, which keeps
    the label's values bounded whatever paths clients send."""
    if request.url_rule is not None:
        return request.url_rule.rule
    refused = request.routing_exception
    if isinstance(refused, MethodNotAllowed) and refused.valid_methods:
        rule, _ = app.url_map.bind_to_environ(request.environ).match(method=refused.valid_methods[0],
                                                                    return_rule=True)
        return rule.rule
    return "unmatched"
