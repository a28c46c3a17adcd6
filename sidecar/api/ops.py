"""Operations endpoints: liveness, readiness (model, encode threads and store), Prometheus metrics, the API
description."""

from __future__ import annotations

import os
from importlib.resources import files

from flask import Blueprint, Response, jsonify

from sidecar.api.auth import sent_without_key
from sidecar.api.state import current_state
from sidecar.serving import metrics
from sidecar.stores.base import QueryModelMismatch

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Ready (200) or not (503), to anyone; the details (model, store, documents, the reason it is not, the
    answering worker's pid) only to a caller with a key where the API takes keys (`auth.STATUS_ONLY_PATHS`).
    Keyless callers share one answer a second per worker (`state.SharedReadiness`); a caller with a key gets it
    fresh."""
    readiness = current_state().readiness
    if sent_without_key():
        answer, status = readiness.shared(_readiness)
        return jsonify({"status": answer["status"]}), status
    answer, status = readiness.fresh(_readiness)
    return jsonify(answer), status


def _readiness() -> tuple[dict, int]:
    state = current_state()
    encoder = state.encoding.encoder
    stopped = state.stopped
    if stopped is not None:
        return _not_ready(stopped)
    try:
        documents = state.store.count()
        state.check_store_model()
    except QueryModelMismatch as exc:
        return _not_ready(str(exc))
    except Exception as exc:  # noqa: BLE001 - readiness reports, it does not crash
        return _not_ready(f"store {state.store.name} unavailable: {exc}")
    return {"status": "ready", "model": encoder.name, "weights": encoder.weights, "dim": encoder.dim,
            "device": str(encoder.device), "precision": encoder.precision, "store": state.store.name,
            "documents": documents, "request_timeout_s": state.settings.request_timeout_s,
            "pid": os.getpid()}, 200  # pid: which gunicorn worker answered; request_timeout_s: the page's wait


def _not_ready(reason: str) -> tuple[dict, int]:
    """Every 503 of /readyz: why, and which gunicorn worker said so (as the 200 names it)."""
    return {"status": "not_ready", "reason": reason, "pid": os.getpid()}, 503


@bp.get("/openapi.yaml")
def openapi():
    return Response((files("sidecar") / "openapi.yaml").read_text(encoding="utf-8"), mimetype="application/yaml")


@bp.get("/metrics")
def prometheus_metrics():
    state = current_state()
    state.quality.update_gauges(state.store)
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
