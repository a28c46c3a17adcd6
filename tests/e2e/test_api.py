"""The real Flask app, the trained tiny model and a real embedded store: relevance and bad input."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.support import image_b64, png_b64


def manifest_rows(corpus):
    return [json.loads(line) for line in corpus.read_text().splitlines()]


# ---- embeddings ---------------------------------------------------------------------------

def test_text_embeddings_speak_the_openai_shape_and_are_normalised(client, encoder):
    response = client.post("/v1/embeddings", json={"input": ["red circle", "blue square"]})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["object"] == "list" and body["model"] == encoder.name
    assert [d["index"] for d in body["data"]] == [0, 1]
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (2, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 0 and body["truncated"] == []


def test_base64_encoding_format_carries_the_same_float32_vectors(client):
    texts = {"input": ["red circle", "blue square"]}
    floats = client.post("/v1/embeddings", json=texts).json["data"]
    packed = client.post("/v1/embeddings", json={**texts, "encoding_format": "base64"}).json["data"]
    for f, b in zip(floats, packed):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4"),
                                      np.asarray(f["embedding"], dtype=np.float32))
    response = client.post("/v1/embeddings", json={**texts, "encoding_format": "binary"})
    assert response.status_code == 400 and "encoding_format" in response.json["error"]["message"]


def test_single_string_input_and_image_items(client, corpus):
    path = corpus.parent / manifest_rows(corpus)[0]["path"]
    response = client.post("/v1/embeddings", json={"input": [
        {"type": "text", "text": "red circle"}, {"type": "image", "image": image_b64(path)}]})
    assert response.status_code == 200, response.json
    assert len(response.json["data"]) == 2
    assert client.post("/v1/embeddings", json={"input": "red circle"}).json["data"][0]["index"] == 0
    data_url = "data:image/jpeg;base64," + image_b64(path)
    assert client.post("/v1/embeddings", json={"input": [data_url], "modality": "image"}).status_code == 200


def test_image_embedding_is_closest_to_its_own_caption(client, corpus):
    row = next(r for r in manifest_rows(corpus) if r["metadata"]["color"] == "red")
    image = client.post("/v1/embeddings", json={"input": [image_b64(corpus.parent / row["path"])],
                                                "modality": "image"}).json["data"][0]["embedding"]
    colours = ["red", "green", "blue", "yellow"]
    shape = row["metadata"]["shape"]
    texts = client.post("/v1/embeddings", json={"input": [f"{c} {shape}" for c in colours]}).json["data"]
    scores = [float(np.dot(image, t["embedding"])) for t in texts]
    assert colours[int(np.argmax(scores))] == "red"


def test_long_text_is_truncated_visibly(client, encoder):
    long_text = "a large red circle on the left " * 40
    response = client.post("/v1/embeddings", json={"input": ["red", long_text]})
    assert response.status_code == 200
    assert response.json["truncated"] == [1]
    assert response.json["usage"]["prompt_tokens"] <= 2 * encoder.context_length


# ---- search -------------------------------------------------------------------------------

def matching(corpus, **attributes) -> int:
    return sum(all(r["metadata"][k] == v for k, v in attributes.items()) for r in manifest_rows(corpus))


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
@pytest.mark.parametrize(("query", "color", "shape"), [("red circle", "red", "circle"),
                                                       ("blue square", "blue", "square"),
                                                       ("green triangle", "green", "triangle")])
def test_text_search_returns_the_concept_at_the_top(client, corpus, mode, query, color, shape):
    response = client.post("/v1/search", json={"text": query, "mode": mode, "k": 10})
    assert response.status_code == 200, response.json
    hits = response.json["hits"]
    assert len(hits) == 10
    expected = min(10, matching(corpus, color=color, shape=shape))
    assert expected >= 2, "the corpus should hold the concept"
    for hit in hits[:expected]:
        assert (hit["metadata"]["color"], hit["metadata"]["shape"]) == (color, shape), hit
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_hits_explain_their_rank_with_per_stage_scores(client):
    body = client.post("/v1/search", json={"text": "green triangle", "mode": "hybrid", "k": 3}).json
    hits = body["hits"]
    assert "fused" in hits[0]["scores"] and ("vector" in hits[0]["scores"] or "bm25" in hits[0]["scores"])
    # No fine model in this app: the rerank asked for by default is skipped, and the response says why.
    assert body["rerank"] is False and "no fine model" in body["rerank_skipped"] and "rerank" not in hits[0]["scores"]
    plain = client.post("/v1/search", json={"text": "green triangle", "k": 3, "rerank": False}).json
    assert plain["rerank"] is False and "rerank_skipped" not in plain


def test_bm25_mode_matches_words(client):
    hits = client.post("/v1/search", json={"text": "yellow star", "mode": "bm25", "k": 5}).json["hits"]
    assert hits and all("yellow" in h["text"] or "star" in h["text"] for h in hits)
    assert all(h["scores"]["bm25"] > 0 for h in hits)


def test_image_query_finds_more_like_this_photo(client, corpus):
    row = manifest_rows(corpus)[3]
    response = client.post("/v1/search", json={"image": image_b64(corpus.parent / row["path"]), "k": 5})
    assert response.status_code == 200, response.json
    hits = response.json["hits"]
    assert hits[0]["id"] == row["id"]
    same = [h for h in hits if h["metadata"]["color"] == row["metadata"]["color"]]
    assert len(same) >= 3


def test_an_indexed_photo_queried_by_itself_gets_its_indexed_vector(client, corpus):
    # The embed job and the API decode through one path (sidecar.model.images), draft mode
    # included: the query vector is the stored one, not a near copy.
    for row in manifest_rows(corpus)[:5]:
        response = client.post("/v1/search", json={"image": image_b64(corpus.parent / row["path"]), "k": 1,
                                                   "exact": True})
        hit = response.json["hits"][0]
        assert hit["id"] == row["id"] and hit["scores"]["vector"] > 0.99999


def test_filters_restrict_every_hit(client):
    response = client.post("/v1/search", json={"text": "circle", "k": 10, "filters": {"color": ["blue", "green"]}})
    assert response.status_code == 200, response.json
    assert {h["metadata"]["color"] for h in response.json["hits"]} <= {"blue", "green"}


@pytest.mark.parametrize("fusion", ["minmax", "zscore", "rrf"])
def test_every_fusion_method_ranks_the_concept_first(client, fusion):
    hits = client.post("/v1/search", json={"text": "blue square", "fusion": fusion, "k": 5}).json["hits"]
    assert all((h["metadata"]["color"], h["metadata"]["shape"]) == ("blue", "square") for h in hits), hits


# ---- operations ---------------------------------------------------------------------------

def test_health_readiness_and_metrics(client, encoder):
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz").json
    assert ready["status"] == "ready" and ready["dim"] == encoder.dim and ready["documents"] == 400
    client.post("/v1/search", json={"text": "red circle"})
    text = client.get("/metrics").get_data(as_text=True)
    for series in ("sidecar_requests_total", "sidecar_stage_seconds_bucket", "sidecar_batch_size_bucket",
                   "sidecar_queue_depth", "sidecar_text_cache_lookups_total"):
        assert series in text
    assert 'stage="forward"' in text and 'stage="queue_wait"' in text and 'stage="rerank"' in text


# ---- bad input: 4xx naming the field and the limit, never a 500 ---------------------------

@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/embeddings", {}, 400, "field 'input' is required"),
        ("/v1/embeddings", {"input": 5}, 400, "field 'input' must be a string or a list"),
        ("/v1/embeddings", {"input": [1, 2]}, 400, "field 'input[0]' must be a string or an object"),
        ("/v1/embeddings", {"input": []}, 400, "field 'input' is empty"),
        ("/v1/embeddings", {"input": ["x"] * 9}, 413, "9 items, over the limit of 8 (max_batch_items)"),
        ("/v1/embeddings", {"input": ["%%%"], "modality": "image"}, 400, "field 'input[0]' is not valid base64"),
        ("/v1/embeddings", {"input": [base64.b64encode(b"hello world").decode()], "modality": "image"}, 415,
         "field 'input[0]': not a recognised image format"),
        ("/v1/embeddings", {"input": [png_b64(size=(1200, 1000))], "modality": "image"}, 413,
         "over the limit of 1000000 (max_image_pixels)"),
        ("/v1/embeddings", {"input": ["x"], "modality": "audio"}, 400, "field 'modality' must be one of text, image"),
        ("/v1/embeddings", {"input": [{"type": "image"}]}, 400, "field 'input[0].image' is required"),
        ("/v1/search", {}, 400, "send field 'text', field 'image'"),
        ("/v1/search", {"text": "red", "mode": "semantic"}, 400, "field 'mode' must be one of vector, bm25, hybrid"),
        ("/v1/search", {"text": "red", "k": 0}, 400, "field 'k' must be between 1 and 1000"),
        ("/v1/search", {"text": "red", "k": "ten"}, 400, "field 'k' must be an integer"),
        ("/v1/search", {"text": "red", "k": True}, 400, "field 'k' must be an integer"),
        ("/v1/search", {"image": png_b64(), "mode": "bm25"}, 400, "field 'text' is required for mode bm25"),
        ("/v1/search", {"text": "red", "fusion": "max"}, 400, "field 'fusion' must be one of minmax, zscore, rrf"),
        ("/v1/search", {"text": "red", "weights": {"vector": -1}}, 400, "field 'weights' values must be numbers"),
        ("/v1/search", {"text": "red", "filters": {"color": {}}}, 400, "field 'filters.color'"),
        ("/v1/search", {"text": "red", "image": "not base64!"}, 400, "field 'image' is not valid base64"),
    ],
)
def test_bad_input_answers_4xx_naming_the_field(client, path, body, status, message):
    response = client.post(path, json=body)
    assert response.status_code == status, response.json
    assert response.json["error"]["code"]
    assert message in response.json["error"]["message"]


def test_wrong_content_type_invalid_json_and_oversized_body(client):
    response = client.post("/v1/embeddings", data="input=x", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and "application/json" in response.json["error"]["message"]
    response = client.post("/v1/embeddings", data="{not json", content_type="application/json")
    assert response.status_code == 400 and "not valid JSON" in response.json["error"]["message"]
    response = client.post("/v1/embeddings", data=json.dumps({"input": ["x" * 300_000]}),
                           content_type="application/json")
    assert response.status_code == 413 and "262144 bytes (max_body_bytes)" in response.json["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/nothing").json["error"]["code"] == "not_found"
