"""The fine stage end to end: embed with --fine-model, index, and /v1/search re-scoring with the strong model."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.model.synthetic import SHAPES
from sidecar.model.tiny_model import LARGE_MODEL_NAME
from sidecar.stores.embedded import EmbeddedStore
from tests.support import search_pages

pytestmark = pytest.mark.slow  # trains the stronger tiny model once per test run (a few minutes)


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


def test_bm25_mode_takes_a_query_image_where_its_fine_stage_reads_it_and_refuses_it_where_none_would(fine_client):
    from tests.support import png_b64

    query = {"text": "circle", "image": png_b64(), "mode": "bm25", "k": 5}
    refused = fine_client.post("/v1/search", json=query)
    assert refused.status_code == 400 and "field 'image': mode bm25 ranks by the text alone" in \
        refused.json["error"]["message"]
    asked = fine_client.post("/v1/search", json={**query, "rerank": True}).json
    assert asked["rerank"] is True and all("fine" in h["scores"] for h in asked["hits"])


def test_an_image_query_is_reranked_by_the_fine_models_view_of_the_image(fine_client, corpus):
    from tests.support import image_b64

    row = json.loads(corpus.read_text(encoding="utf-8").splitlines()[3])
    body = fine_client.post("/v1/search", json={"image": image_b64(corpus.parent / row["path"]), "k": 3}).json
    assert body["rerank"] is True and body["hits"][0]["id"] == row["id"]
    assert body["hits"][0]["scores"]["fine"] > 0.999  # the fine model's vector of the very same image


# ---- the rerank endpoint OpenSearch calls runs the same stage ----------------------------------

def rerank_scores(client, kind: str, query: str, documents: list[str]) -> list[float]:
    response = client.post(f"/v1/opensearch/rerank/{kind}", json={"query": query, "documents": documents})
    assert response.status_code == 200, response.json
    assert "rerank_skipped" not in response.json and response.json["fine_model"].startswith(LARGE_MODEL_NAME)
    return [r["relevance_score"] for r in response.json["results"]]


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_pages_past_the_fine_stages_candidates_follow_it_in_coarse_order_none_repeated_none_skipped(fine_client, mode):
    # Before, each page past the 10 candidates had the fine stage rank offset + k: 34 of 60 hits repeated.
    query = {"text": "red circle", "mode": mode, "exact": True, "candidates": 10}
    pages = search_pages(fine_client, query, k=5, limit=60)
    assert all(page["rerank"] is True for page in pages)  # the fine stage ranked the ranking's first 10, any page's
    hits = [h for page in pages for h in page["hits"]]
    paged = [h["id"] for h in hits]
    assert len(set(paged)) == 60 and paged == [h["id"] for h in fine_client.post(
        "/v1/search", json={**query, "k": 60}).json["hits"]]
    window = fine_client.post("/v1/search", json={**query, "k": 10}).json["hits"]
    assert hits[:10] == window and all("fine" in h["scores"] for h in window)
    # Past the candidates: coarse scores only, in the coarse order (vector mode: the one exact ranking's).
    assert all({"fine", "rerank"}.isdisjoint(h["scores"]) for h in hits[10:])
    assert [h["score"] for h in hits[10:]] == sorted((h["score"] for h in hits[10:]), reverse=True)
    if mode == "vector":
        coarse = fine_client.post("/v1/search", json={**query, "k": 60, "candidates": 60, "rerank": False}).json
        assert paged[10:] == [h["id"] for h in coarse["hits"] if h["id"] not in set(paged[:10])][:50]


def test_the_rerank_by_id_opensearch_calls_scores_exactly_as_v1_search(fine_client):
    # All 400 documents as candidates: every lexical match is among them on both paths.
    hits = fine_client.post("/v1/search", json={"text": "red circle", "mode": "hybrid", "k": 400,
                                                "candidates": 400}).json["hits"]
    shuffled = [hits[i]["id"] for i in np.random.default_rng(0).permutation(len(hits))]
    scores = dict(zip(shuffled, rerank_scores(fine_client, "ids", "red circle", shuffled)))
    in_search_order = [scores[h["id"]] for h in hits]
    np.testing.assert_allclose(in_search_order, [h["scores"]["rerank"] for h in hits], atol=1e-6)
    # So OpenSearch's rerank processor, sorting by these scores, puts the page in /v1/search's order.
    assert all(a >= b - 1e-6 for a, b in zip(in_search_order, in_search_order[1:]))
    assert hits[0]["scores"]["fine"] != hits[0]["scores"].get("vector")  # the fine model's, not the coarse one's


def test_a_rerank_query_past_max_text_chars_is_cut_for_bm25_as_v1_search_cuts_its_text(fine_client):
    # Past the first max_text_chars (4096) characters: words BM25 would match if it saw them. /v1/search ranks by
    # the cut text; the rerank by id gave the fine model the cut text but BM25 the whole one (other scores).
    text = "red circle".ljust(Settings().max_text_chars) + " blue square" * 20
    hits = fine_client.post("/v1/search", json={"text": text, "mode": "hybrid", "k": 400,
                                                "candidates": 400}).json["hits"]
    ids = [h["id"] for h in hits]
    np.testing.assert_allclose(rerank_scores(fine_client, "ids", text, ids), [h["scores"]["rerank"] for h in hits],
                               atol=1e-6)


@pytest.fixture
def client_without_fine_vectors(tmp_path, encoder, fine_encoder, store_path):
    """A fine model, but documents indexed without one (as the ingest pipeline writes them)."""
    store = EmbeddedStore(store_path)
    app = create_app(Settings(cache_dir=tmp_path / "cache", store_path=store_path), encoder=encoder, store=store,
                     fine_encoder=fine_encoder)
    yield app.test_client()
    state_of(app).encoding.close()
    state_of(app).fine_encoding.close()
    store.close()


def test_the_rerank_opensearch_calls_keeps_the_page_order_where_documents_lack_fine_vectors(
        client_without_fine_vectors):
    ids = ["item-000003", "item-000001", "item-000002"]
    answer = client_without_fine_vectors.post("/v1/opensearch/rerank/ids",
                                              json={"query": "red circle", "documents": ids}).json
    search = client_without_fine_vectors.post("/v1/search", json={"text": "red circle", "k": 3}).json
    assert "3 of 3 candidates" in answer["rerank_skipped"] and "have no fine-model vector" in search["rerank_skipped"]
    scores = [r["relevance_score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3


def test_like_of_a_document_without_a_fine_vector_skips_the_rerank_naming_the_document_and_the_fix(
        client_without_fine_vectors):
    body = client_without_fine_vectors.post("/v1/search", json={"like": "item-000001", "k": 3}).json
    assert body["rerank"] is False and len(body["hits"]) == 3
    assert body["rerank_skipped"] == ("the liked document 'item-000001' has no fine-model vector: embed it with "
                                      "--fine-model and index again")


def test_like_with_text_of_a_document_without_a_fine_vector_skips_the_rerank_instead_of_ranking_by_the_text_alone(
        tmp_path, encoder, fine_encoder, fine_store_path):
    # A store where every document but the liked one has a fine vector; the filter keeps the liked one out of
    # the candidates, so every candidate could be fine-ranked (by the text alone: the like half dropped).
    path = tmp_path / "store"
    shutil.copytree(fine_store_path, path)
    store = EmbeddedStore(path)
    liked = store.fetch(["item-000001"])[0]
    store.upsert([dataclasses.replace(liked, fine_vector=None)])
    app = create_app(Settings(cache_dir=tmp_path / "cache", store_path=path), encoder=encoder, store=store,
                     fine_encoder=fine_encoder)
    try:
        others = {"shape": [shape for shape in SHAPES if shape != liked.metadata["shape"]]}
        body = app.test_client().post("/v1/search", json={"like": "item-000001", "text": "red", "k": 5,
                                                          "filters": others}).json
        assert body["rerank"] is False and len(body["hits"]) == 5
        assert body["rerank_skipped"] == ("the liked document 'item-000001' has no fine-model vector: embed it "
                                          "with --fine-model and index again")
    finally:
        state_of(app).encoding.close()
        state_of(app).fine_encoding.close()
        store.close()


def skipped_fine_stages(app) -> tuple[dict, list[str]]:
    """/v1/search and /v1/opensearch/rerank/ids of one query, both answered with the fine stage skipped:
    (the rerank's answer, the two reasons given)."""
    client = app.test_client()
    search = client.post("/v1/search", json={"text": "red circle", "k": 3})
    rerank = client.post("/v1/opensearch/rerank/ids", json={"query": "red circle",
                                                             "documents": ["item-000001", "item-000002"]})
    assert search.status_code == rerank.status_code == 200
    assert search.json["rerank"] is False and len(search.json["hits"]) == 3
    return rerank.json, [search.json["rerank_skipped"], rerank.json["rerank_skipped"]]


def test_fine_vectors_of_another_fine_model_skip_the_rerank_saying_so_not_a_5xx(tmp_path, encoder, fine_store_path):
    # The store's fine vectors come from tiny-clip-large (128-d); this server's fine model is tiny-clip (64-d).
    store = EmbeddedStore(fine_store_path)
    app = create_app(Settings(cache_dir=tmp_path / "cache", store_path=fine_store_path), encoder=encoder, store=store,
                     fine_encoder=encoder)
    try:
        _, reasons = skipped_fine_stages(app)
        for reason in reasons:
            assert reason.startswith("the candidates' fine vectors have 128 dimensions, this server's fine model "
                                     "gives 64: embedded with another fine model")
    finally:
        state_of(app).encoding.close()
        state_of(app).fine_encoding.close()
        store.close()


def test_a_served_fine_model_of_the_same_size_but_other_weights_skips_the_rerank_naming_both(
        tmp_path, encoder, fine_encoder, fine_store_path):
    # The store's fine vectors come from tiny-clip-large; this server serves the same architecture (128-d)
    # with other weights: the vectors' size cannot tell, the fine model the index run recorded can.
    retrained = copy.copy(fine_encoder)
    retrained.weights = "retrained"
    retrained.signature = dataclasses.replace(fine_encoder.signature, weights="retrained")
    store = EmbeddedStore(fine_store_path)
    assert store.fine_signature() == fine_encoder.signature
    app = create_app(Settings(cache_dir=tmp_path / "cache", store_path=fine_store_path), encoder=encoder, store=store,
                     fine_encoder=retrained)
    try:
        reranked, reasons = skipped_fine_stages(app)
        assert [r["relevance_score"] for r in reranked["results"]] == [1.0, 0.5]  # the page's own order
        for reason in reasons:
            assert reason.startswith(f"the candidates' fine vectors were embedded with "
                                     f"{fine_encoder.signature.describe()}, this server's fine model is "
                                     f"{retrained.signature.describe()}: serve that one")
    finally:
        state_of(app).encoding.close()
        state_of(app).fine_encoding.close()
        store.close()


def test_the_rerank_of_texts_and_images_is_the_fine_models_similarity(fine_client, fine_encoder, corpus):
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()[:4]]
    query = fine_encoder.encode_texts(["red circle"])[0]
    texts = [row["text"] for row in rows]
    np.testing.assert_allclose(rerank_scores(fine_client, "texts", "red circle", texts),
                               fine_encoder.encode_texts(texts) @ query, atol=1e-5)
    # The same images' fine vectors as `embed --fine-model` stored them (the one image decoder of the project).
    stored = {doc.id: doc.fine_vector for doc in state_of(fine_client.application).store.fetch([r["id"] for r in rows])}
    images = [base64.b64encode((corpus.parent / row["path"]).read_bytes()).decode() for row in rows]
    np.testing.assert_allclose(rerank_scores(fine_client, "images", "red circle", images),
                               [float(stored[row["id"]] @ query) for row in rows], atol=1e-4)
