"""The `floor` variant of bench/serve_load.py: the sidecar's own app (create_app, its hooks, its JSON
provider) under the same gunicorn config, with POST /v1/embeddings answered from a precomputed
vector in the same response shape: no validation, tokeniser, cache or batcher. What a request
costs the server here is the HTTP floor the real handler is measured against.

    gunicorn --config python:sidecar.api.gunicorn_config --pythonpath bench serve_floor:app
"""

from __future__ import annotations

import base64

import numpy as np
from flask import jsonify, request

from sidecar.api.app import create_app
from sidecar.api.state import state_of

app = create_app()
_encoder = state_of(app).encoding.encoder
_vector = np.ones(_encoder.dim, dtype="<f4") / np.sqrt(_encoder.dim)
_BASE64 = base64.b64encode(_vector.tobytes()).decode("ascii")
_FLOATS = _vector.tolist()


def precomputed_embeddings():
    body = request.get_json()
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    vector = _BASE64 if body.get("encoding_format") == "base64" else _FLOATS
    return jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))],
        "model": _encoder.name, "weights": _encoder.weights, "dimensions": _encoder.dim, "truncated": [],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    })


app.view_functions["embeddings.create_embeddings"] = precomputed_embeddings
