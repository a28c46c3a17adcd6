"""Operations endpoints: liveness, readiness (model and store loaded), Prometheus metrics, the API description."""

from __future__ import annotations

import os
from importlib.resources import files

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.api.state import current_state

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    state = current_state()
    encoder = state.encoding.encoder
    try:
        documents = state.store.count()
    except Exception as exc:  # noqa: BLE001 - readiness reports, it does not crash
        return jsonify({"status": "not_ready", "reason": f"store {state.store.name} unavailable: {exc}"}), 503
    return jsonify({"status": "ready", "model": encoder.name, "weights": encoder.weights, "dim": encoder.dim,
                    "device": str(encoder.device), "precision": encoder.precision,
                    "store": state.store.name, "documents": documents,
                    "pid": os.getpid()})  # which gunicorn worker answered


@bp.get("/openapi.yaml")
def openapi():
    return Response((files("sidecar") / "openapi.yaml").read_text(encoding="utf-8"), mimetype="application/yaml")


@bp.get("/metrics")
def prometheus_metrics():
    return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
