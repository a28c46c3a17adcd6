"""A store whose vectors are of another model than the one served: `serve` and the app factory refuse to
start against it, `search` refuses it, and a store claimed by another model while serving answers vector
searches 409 model_mismatch (not 500, and not a silently wrong ranking)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.cli import main
from sidecar.stores.base import QueryModelMismatch
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature
from tests.support import ends_with_the_test_run, free_port, gunicorn_boot, png_b64


@pytest.fixture
def other_models_store(tmp_path, encoder):
    """A store holding vectors of another model of the served model's size: only the record tells them apart."""
    path = tmp_path / "other-store"
    other = ModelSignature(model="other-clip", weights="other-weights", dim=encoder.dim)
    with EmbeddedStore(path) as store:
        store.claim(other)
        vectors = np.random.default_rng(0).standard_normal((3, encoder.dim)).astype(np.float32)
        store.upsert([Document(id=f"d{i}", vector=v / np.linalg.norm(v), text="red circle")
                      for i, v in enumerate(vectors)])
    return path


def test_serve_refuses_to_start_against_another_models_store_naming_it_and_the_flags(other_models_store):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "serve", "--port", str(port),
                                "--store-path", str(other_models_store)],
                               env={**os.environ, "GUNICORN_LOGLEVEL": "warning"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=ends_with_the_test_run)
    try:
        _, stderr = process.communicate(timeout=120)  # without the check, gunicorn serves on until killed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    assert process.returncode == 1, stderr
    assert "not starting the server: store holds vectors of other-clip (weights other-weights" in stderr
    assert "--model / SIDECAR_MODEL, --pretrained / SIDECAR_PRETRAINED" in stderr
    assert "gunicorn" not in stderr  # refused before gunicorn started


def test_the_app_factory_refuses_another_models_store_of_the_same_size(app_settings, encoder, other_models_store):
    # What a gunicorn worker (and the Docker image, which starts gunicorn directly) builds at boot.
    settings = dataclasses.replace(app_settings, store_path=other_models_store)
    with EmbeddedStore(other_models_store) as store:
        with pytest.raises(QueryModelMismatch, match=rf"vectors of other-clip .*encoded by {encoder.name} "):
            create_app(settings, encoder=encoder, store=store)


def test_gunicorn_started_directly_stops_in_one_line_against_another_models_store(other_models_store):
    # The Docker image's way: no `serve` before it, so each worker's app factory is the check.
    result = gunicorn_boot({**os.environ, "SIDECAR_STORE_PATH": str(other_models_store), "GUNICORN_LOGLEVEL": "warning"})
    assert result.returncode != 0
    assert "store holds vectors of other-clip (weights other-weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_refuses_another_models_store_of_the_same_size(other_models_store):
    result = CliRunner().invoke(main, ["-q", "search", "red circle", "--store-path", str(other_models_store)])
    assert result.exit_code == 1
    assert "store holds vectors of other-clip (weights other-weights" in result.output
    bm25 = CliRunner().invoke(main, ["-q", "search", "red circle", "--mode", "bm25",
                                     "--store-path", str(other_models_store)])
    assert bm25.exit_code == 0 and "d0" in bm25.output  # BM25 needs no vector of either model


def test_a_store_claimed_by_another_model_while_serving_answers_vector_searches_409_naming_both(
        app_settings, encoder, tmp_path):
    settings = dataclasses.replace(app_settings, store_path=tmp_path / "store")
    store = EmbeddedStore(settings.store_path)  # empty and unclaimed: the server starts
    app = create_app(settings, encoder=encoder, store=store)
    try:
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        # Another model's `index` into the store the server reads, here of another size: its vectors cannot
        # be searched by this server's at all.
        other = ModelSignature(model="other-clip", weights="other-weights", dim=2 * encoder.dim)
        with EmbeddedStore(settings.store_path) as indexer:
            indexer.claim(other)
            indexer.upsert([Document(id="d0", vector=np.eye(other.dim, dtype=np.float32)[0], text="red circle")])
        for path, body in (("/v1/search", {"text": "red"}), ("/v1/search", {"image": png_b64()}),
                           ("/v1/search", {"text": "red", "like": "d0"}), ("/v1/captions", {"image": png_b64()}),
                           ("/v1/captions", {"like": "d0"})):
            response = client.post(path, json=body)
            assert response.status_code == 409, (path, body, response.json)
            assert response.json["error"]["code"] == "model_mismatch"
            message = response.json["error"]["message"]
            assert "vectors of other-clip (weights other-weights" in message and f"encoded by {encoder.name} " in message
        # What needs no vector of this server's model still answers: BM25, and `like` (the stored vector).
        assert client.post("/v1/search", json={"text": "red", "mode": "bm25"}).status_code == 200
        assert [hit["id"] for hit in client.post("/v1/search", json={"like": "d0"}).json["hits"]] == ["d0"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "vectors of other-clip" in ready.json["reason"]
    finally:
        state_of(app).quality.close()
        state_of(app).encoding.close()
        store.close()
