"""The `floor` variant of bench/serve_load.py: the sidecar's own app (create_app, its hooks, its JSON
provider) under the same gunicorn config, with POST /v1/embeddings answered from a precomputed
vector in the same response shape: no validation, tokeniser, cache or batcher. What a request
costs the server here is the HTTP floor the real handler is measured against.

With FLOOR_FORWARD=1 (serve_load's `floor-forward` variant) each request also runs the model's text
forward on one fixed text on its own thread, counted as forward CPU as the batcher counts it: what the
forward itself does to the CPU the rest of a request takes (on a CPU it evicts the request path's
caches), apart from everything the sidecar adds around it. Read it at concurrency 1: under load
the request threads run their forwards at once and contend.

    gunicorn --config python:sidecar.api.gunicorn_config --pythonpath bench serve_floor:app
"""

from __future__ import annotations

import base64
import os
import time

import numpy as np
from flask import jsonify, request

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.serving import metrics

app = create_app()
_encoder = state_of(app).encoding.encoder
_vector = np.ones(_encoder.dim, dtype="<f4") / np.sqrt(_encoder.dim)
_BASE64 = base64.b64encode(_vector.tobytes()).decode("ascii")
_FLOATS = _vector.tolist()
_FORWARD = os.environ.get("FLOOR_FORWARD") == "1"
_TOKENS = _encoder.prepare_texts(["a photo of a red circle"]).tokens
_FORWARD_CPU = metrics.FORWARD_CPU_SECONDS.labels("text", "coarse")


def precomputed_embeddings():
    body = request.get_json()
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    vector = _BASE64 if body.get("encoding_format") == "base64" else _FLOATS
    if _FORWARD:
        started = time.thread_time()
        _encoder.postprocess(_encoder.forward_texts(_TOKENS))
        _FORWARD_CPU.inc(time.thread_time() - started)
    return jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))],
        "model": _encoder.name, "weights": _encoder.weights, "dimensions": _encoder.dim, "truncated": [],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    })


app.view_functions["embeddings.create_embeddings"] = precomputed_embeddings
