"""The fine stage end to end: embed with --fine-model, index, and /v1/search re-scoring with the strong model."""

from __future__ import annotations

import json

import pytest

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.model.tiny_model import LARGE_MODEL_NAME
from sidecar.stores.embedded import EmbeddedStore

pytestmark = pytest.mark.slow  # trains the stronger tiny model once per test run (a few minutes)


@pytest.fixture(scope="session")
def fine_store_path(encoder, fine_encoder, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("fine")
    embed_corpus(encoder, corpus, root / "shards", workers=0, fine_encoder=fine_encoder, progress=False)
    with EmbeddedStore(root / "store") as store:
        index_shards(store, root / "shards", progress=False)
    return root / "store"


@pytest.fixture
def fine_client(tmp_path, encoder, fine_encoder, fine_store_path):
    settings = Settings(cache_dir=tmp_path / "cache", store_path=fine_store_path)
    store = EmbeddedStore(fine_store_path)
    app = create_app(settings, encoder=encoder, store=store, fine_encoder=fine_encoder)
    yield app.test_client()
    state = state_of(app)
    state.encoding.close()
    state.fine_encoding.close()
    store.close()


def test_search_reranks_with_the_fine_model_and_names_it(fine_client, corpus):
    body = fine_client.post("/v1/search", json={"text": "red circle", "k": 5}).json
    assert body["rerank"] is True and body["fine_model"].startswith(LARGE_MODEL_NAME)
    assert "rerank_skipped" not in body
    assert all({"vector", "bm25", "fine", "rerank"} <= h["scores"].keys() for h in body["hits"] if "bm25" in h["scores"])
    assert [h["score"] for h in body["hits"]] == [h["scores"]["rerank"] for h in body["hits"]]
    # Vector mode: the strong model's order alone (no lexical evidence to fuse) puts the concept first.
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    expected = min(5, sum((r["metadata"]["color"], r["metadata"]["shape"]) == ("green", "triangle") for r in rows))
    assert expected >= 2, "the corpus should hold the concept"
    body = fine_client.post("/v1/search", json={"text": "green triangle", "mode": "vector", "k": 5}).json
    assert body["rerank"] is True
    for hit in body["hits"][:expected]:
        assert (hit["metadata"]["color"], hit["metadata"]["shape"]) == ("green", "triangle"), hit
    assert all(hit["score"] == hit["scores"]["fine"] for hit in body["hits"])


def test_bm25_mode_stays_bm25_unless_the_rerank_is_asked_for(fine_client):
    body = fine_client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 5}).json
    assert body["rerank"] is False and "rerank_skipped" not in body
    assert all(set(h["scores"]) == {"bm25"} for h in body["hits"])
    asked = fine_client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 5, "rerank": True}).json
    assert asked["rerank"] is True and all("fine" in h["scores"] for h in asked["hits"])


def test_an_image_query_is_reranked_by_the_fine_models_view_of_the_image(fine_client, corpus):
    from tests.support import image_b64

    row = json.loads(corpus.read_text(encoding="utf-8").splitlines()[3])
    body = fine_client.post("/v1/search", json={"image": image_b64(corpus.parent / row["path"]), "k": 3}).json
    assert body["rerank"] is True and body["hits"][0]["id"] == row["id"]
    assert body["hits"][0]["scores"]["fine"] > 0.999  # the fine model's vector of the very same image
