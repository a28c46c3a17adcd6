import json

import numpy as np
from flask import Flask

from sidecar.api.json_provider import OrjsonProvider


def answer(body, *, provider: bool = True) -> bytes:
    app = Flask(__name__)
    if provider:
        app.json = OrjsonProvider(app)
    else:
        app.json.sort_keys = False
    with app.app_context():
        return app.json.response(body).get_data()


def test_a_float_vector_reads_back_to_the_same_numbers_in_the_same_key_order():
    vector = np.random.default_rng(0).normal(size=512).astype(np.float32)
    body = {"object": "list", "data": [{"embedding": vector.tolist(), "index": 0}], "model": "m", "tiny": 1e-05}
    written = answer(body)
    assert json.loads(written) == json.loads(answer(body, provider=False)) == body
    assert list(json.loads(written)) == ["object", "data", "model", "tiny"]
    assert written.endswith(b"\n")


def test_what_orjson_refuses_is_written_by_the_standard_library():
    body = {"text": "lone \ud800 surrogate"}
    assert answer(body) == answer(body, provider=False)
