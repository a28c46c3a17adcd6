"""`clip-sidecar index --rebuild` on the embedded store, under a running server: gunicorn's workers answer from
the old contents while it builds and from the new ones after, without a restart or a failed request; a rebuild
with another model makes the server refuse vector searches by the model record (409 model_mismatch)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.model.synthetic import write_corpus
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature
from tests.support import gunicorn_server, removed_soon

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def old_and_new_shards(encoder, tmp_path) -> tuple[Path, Path]:
    """Shards of 30 images, and of 20 others (ids item-000000…19: the last 10 old ids are in no new shard)."""
    found = []
    for n, seed in ((30, 31), (20, 32)):
        out = tmp_path / f"shards-{n}"
        embed_corpus(encoder, write_corpus(tmp_path / f"corpus-{n}", n, seed=seed), out, workers=0, progress=False)
        found.append(out)
    return found[0], found[1]


def rebuild_cli(shards: Path, store: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "index", str(shards), "--rebuild", *flags,
                           "--store-path", str(store)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_gunicorn_workers_answer_through_a_rebuild_and_serve_the_new_contents_after_it_without_a_restart(
        old_and_new_shards, tmp_path):
    old, new = old_and_new_shards
    store = tmp_path / "store"
    with EmbeddedStore(store) as opened:
        index_shards(opened, old, progress=False)
    answers: list[tuple[int, int | None, int | None]] = []  # (status, documents, worker pid)
    counted: list[tuple[float, float, int, int]] = []  # /readyz: (sent, answered, worker pid, documents)
    stop = threading.Event()
    with gunicorn_server({"SIDECAR_STORE_PATH": str(store)}, tmp_path / "gunicorn.log", workers=2) as url:

        def ask() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                ready = requests.get(f"{url}/readyz", timeout=30)
                counted.append((sent, time.monotonic(), ready.json().get("pid"), ready.json().get("documents")))
                search = requests.post(f"{url}/v1/search", json={"text": "red circle", "k": 3}, timeout=30)
                answers.append((ready.status_code, ready.json().get("documents"), ready.json().get("pid")))
                answers.append((search.status_code, None, None))

        asking = [threading.Thread(target=ask) for _ in range(3)]
        for thread in asking:
            thread.start()
        try:
            refused = rebuild_cli(new, store)
            assert refused.returncode == 1 and "10 stored documents are in no shard of" in refused.stderr
            assert not (store / "current").exists()  # refused before anything was built
            during = len(answers)
            done = rebuild_cli(new, store, "--drop-unsharded")
            assert done.returncode == 0, done.stderr
            assert "store now holds 20 documents" in done.stdout
            assert len(answers) > during  # the server kept answering while the rebuild ran
            deadline = time.monotonic() + 60
            while {pid for _, documents, pid in answers[-40:] if documents == 20} != \
                    {pid for _, _, pid in answers if pid is not None}:
                assert time.monotonic() < deadline, answers[-40:]
                time.sleep(0.2)
        finally:
            stop.set()
            for thread in asking:
                thread.join(timeout=60)
        assert {status for status, _, _ in answers} == {200}
        assert {documents for *_, documents in counted} == {30, 20}
        # A worker that answered from the new version answers every request sent after that from it, never
        # from the old one again (requests already running finish on the version they started on).
        for pid in {pid for _, _, pid, _ in counted}:
            moved = min(answered for _, answered, worker, documents in counted if worker == pid and documents == 20)
            assert {documents for sent, _, worker, documents in counted if worker == pid and sent > moved} == {20}
        assert os.readlink(store / "current") == "version.1"
        assert removed_soon(store / "store.sqlite")  # no worker reads version 0 any more: removed
        hits = requests.post(f"{url}/v1/search", json={"text": "red circle", "k": 30}, timeout=30).json()["hits"]
        assert len(hits) == 20 and all(int(hit["id"].split("-")[1]) < 20 for hit in hits)


def app_serving_three_of_six(app_settings, encoder, tmp_path):
    """Six documents of the served model's size, the first three stored, and an app serving that store:
    (settings, documents, app); the caller closes the app's state."""
    settings = dataclasses.replace(app_settings, store_path=tmp_path / "store")
    vectors = np.random.default_rng(0).standard_normal((6, encoder.dim)).astype(np.float32)
    documents = [Document(id=f"d{i}", vector=v / np.linalg.norm(v), text="red circle") for i, v in enumerate(vectors)]
    with EmbeddedStore(settings.store_path) as writer:
        writer.claim(encoder.signature)
        writer.upsert(documents[:3])
    return settings, documents, create_app(settings, encoder=encoder, store=EmbeddedStore(settings.store_path))


def test_a_rebuild_with_another_model_makes_the_served_app_refuse_vector_searches_409_and_back(
        app_settings, encoder, tmp_path):
    settings, documents, app = app_serving_three_of_six(app_settings, encoder, tmp_path)
    try:
        client = app.test_client()
        assert client.post("/v1/search", json={"text": "red"}).status_code == 200
        other = ModelSignature(model="other-clip", weights="other-weights", dim=encoder.dim)
        with EmbeddedStore(settings.store_path) as rebuilder:
            rebuilder.rebuild(documents, signature=other)
        response = client.post("/v1/search", json={"text": "red"})
        assert response.status_code == 409 and response.json["error"]["code"] == "model_mismatch"
        assert "vectors of other-clip (weights other-weights" in response.json["error"]["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "vectors of other-clip" in ready.json["reason"]
        bm25 = client.post("/v1/search", json={"text": "red", "mode": "bm25", "k": 10})
        assert bm25.status_code == 200 and len(bm25.json["hits"]) == 6  # the rebuilt contents
        with EmbeddedStore(settings.store_path) as rebuilder:  # rebuilt with the served model again
            rebuilder.rebuild(documents[:4], signature=encoder.signature)
        assert client.get("/readyz").json["documents"] == 4
        assert len(client.post("/v1/search", json={"text": "red", "k": 10}).json["hits"]) == 4
    finally:
        state_of(app).close()


def test_a_request_answers_from_one_version_when_a_rebuild_switches_between_its_store_calls(
        app_settings, encoder, tmp_path):
    settings, documents, app = app_serving_three_of_six(app_settings, encoder, tmp_path)
    store = state_of(app).store
    try:
        with app.test_request_context("/v1/search", method="POST"):
            app.preprocess_request()  # the request's before-request hooks
            found = [hit.id for hit in store.text_search("red", 10)]  # a hybrid search's BM25 list
            with EmbeddedStore(settings.store_path) as rebuilder:
                rebuilder.rebuild(documents[3:], signature=encoder.signature)
            assert sorted(found) == ["d0", "d1", "d2"]
            assert [doc.id for doc in store.fetch(found)] == found  # its hits fetched from the same version
            app.do_teardown_request()
        assert sorted(hit["id"] for hit in app.test_client().post(
            "/v1/search", json={"text": "red", "mode": "bm25", "k": 10}).json["hits"]) == ["d3", "d4", "d5"]
    finally:
        state_of(app).close()
