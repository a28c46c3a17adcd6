"""Serving under concurrency: gunicorn for real, overload (503) and timeout (504) through the app."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.stores.embedded import EmbeddedStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gunicorn_server(store_path, tmp_path):
    port = free_port()
    env = {**os.environ, "SIDECAR_STORE_PATH": str(store_path), "GUNICORN_LOGLEVEL": "warning"}
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "serve", "--port", str(port),
                                    "--workers", "1", "--threads", "16"], env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def wait_until_ready(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass  # the worker is still loading the model
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "gunicorn did not become ready"
        time.sleep(0.2)


def test_gunicorn_serves_each_concurrent_caller_its_own_vectors_in_order(gunicorn_server, encoder):
    texts = [f"{colour} {shape}" for colour in ("red", "green", "blue", "yellow") for shape in
             ("circle", "square", "triangle", "star")]

    def call(i: int) -> list:
        batch = [texts[i % 16], texts[(i + 5) % 16]]
        response = requests.post(f"{gunicorn_server}/v1/embeddings", json={"input": batch}, timeout=30)
        assert response.status_code == 200, response.text
        return batch, [d["embedding"] for d in response.json()["data"]]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(64)))
    expected = dict(zip(texts, encoder.encode_texts(texts)))
    for batch, vectors in results:
        for text, vector in zip(batch, vectors):
            np.testing.assert_allclose(vector, expected[text], atol=1e-4)
    metrics = requests.get(f"{gunicorn_server}/metrics", timeout=5).text
    assert 'sidecar_requests_total{endpoint="/v1/embeddings",status="200"} 64.0' in metrics
    hits = requests.post(f"{gunicorn_server}/v1/search", json={"text": "red circle", "k": 3}, timeout=30).json()
    assert hits["hits"][0]["metadata"]["color"] == "red"


@pytest.fixture
def slow_app(tmp_path, store_path, encoder, monkeypatch):
    """The real app whose model takes 200 ms a forward pass: queues fill, deadlines pass."""
    real_forward = encoder.forward_texts

    def slow_forward(tokens):
        time.sleep(0.2)
        return real_forward(tokens)

    monkeypatch.setattr(encoder, "forward_texts", slow_forward)

    built = []

    def build(**limits):
        settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path, **limits)
        built.append(create_app(settings, encoder=encoder, store=EmbeddedStore(store_path)))
        return built[-1]

    yield build
    for app in built:  # join the batcher threads: one may still be inside a slow forward
        state = state_of(app)
        state.encoding.close()
        state.store.close()


def test_a_full_queue_answers_503_with_retry_after(slow_app):
    app = slow_app(queue_size=1, max_batch=1)
    client = app.test_client()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: client.post("/v1/embeddings", json={"input": [f"text {i}"]}), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    overloaded = next(r for r in responses if r.status_code == 503)
    assert overloaded.headers["Retry-After"] == "1"
    assert "queue is full" in overloaded.json["error"]["message"]


def test_an_encode_past_the_deadline_answers_504(slow_app):
    client = slow_app(request_timeout_s=0.05).test_client()
    response = client.post("/v1/embeddings", json={"input": ["red circle"]})
    assert response.status_code == 504
    assert "request_timeout_s=0.05" in response.json["error"]["message"]
