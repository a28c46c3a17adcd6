"""Flask application factory: loads the encoder and store once, registers blueprints and JSON errors."""

from __future__ import annotations

import logging
import time

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from sidecar.api import embeddings, ops, search
from sidecar.api.state import AppState, attach_state
from sidecar.config import Settings
from sidecar.errors import ApiError
from sidecar.model.encoder import Encoder, load_encoder, load_fine_encoder
from sidecar.serving import metrics
from sidecar.serving.encoding import EncodingService
from sidecar.stores import open_store
from sidecar.stores.base import Store

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, encoder: Encoder | None = None,
               store: Store | None = None, fine_encoder: Encoder | None = None) -> Flask:
    """Build the app. Tests pass Settings (and may pass a loaded encoder/store/fine encoder to share them)."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    encoder = encoder or load_encoder(settings)
    fine_encoder = fine_encoder or load_fine_encoder(settings)
    attach_state(app, AppState(settings=settings, encoding=EncodingService(encoder, settings),
                               store=store or open_store(settings),
                               fine_encoding=EncodingService(fine_encoder, settings) if fine_encoder else None))
    for blueprint in (embeddings.bp, search.bp, ops.bp):
        app.register_blueprint(blueprint)
    _register_errors(app, settings)
    _register_request_metrics(app)
    return app


def _register_errors(app: Flask, settings: Settings) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        response = jsonify({"error": {"code": exc.code, "message": exc.message}})
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return response, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"request body is over the limit of {settings.max_body_bytes} bytes (max_body_bytes)"
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify({"error": {"code": code, "message": message}}), exc.code

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
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response
