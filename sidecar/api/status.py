"""GET /v1/status: the last hour's live recall, latency per stage and errors, and the search effort, for
people without Grafana."""

from __future__ import annotations

import os

from flask import Blueprint, jsonify

from sidecar.api.state import current_state

bp = Blueprint("status", __name__)


@bp.get("/v1/status")
def status():
    """Figures of the whole server (every gunicorn worker's series, `sidecar.serving.metric_window`),
    over the last hour or as much of it as the answering worker has seen (`window_s`)."""
    state = current_state()
    settings = state.settings
    summary = state.quality.window.summary()
    effort = state.store.effort.status()
    recall, target = summary["recall"], effort["target_recall"]
    try:
        documents = state.store.count()
    except Exception:  # noqa: BLE001 - the status reports what it can; /readyz says why the store is down
        documents = None
    return jsonify({
        "window_s": summary["window_s"],
        "recall": {**recall, "k": settings.target_recall_k, "target": target,
                   "meets_target": None if recall["value"] is None or target is None else recall["value"] >= target,
                   "monitor_fraction": settings.monitor_fraction},
        "search_effort": effort,
        "stages": summary["stages"],
        "requests": summary["requests"],
        "hard_examples": {"enabled": state.quality.hard_examples is not None, **summary["hard_examples"]},
        "store": state.store.name, "documents": documents,
        "pid": os.getpid(),
    })
