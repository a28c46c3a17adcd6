"""The real Flask app, the trained tiny model and a real embedded store: relevance and bad input."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import io
import json
import os
import re
import threading
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import sidecar
from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.cli import main
from sidecar.config import Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.model.synthetic import write_corpus
from sidecar.retrieval.fusion import RRF_K
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document
from tests.support import cli_ok, image_b64, png_b64, search_pages, write_shards


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


def test_filters_find_fields_named_with_a_backslash_or_quote_and_an_object_field_matches_nothing(build_app, encoder,
                                                                                                  tmp_path):
    # The embedded store found a field by the JSON path $."name", which compares the name as escaped in the
    # JSON text (a backslash matched nothing), and walked an object field's members (their values matched).
    metadata = {"slash": {"a\\b": "x"}, "quote": {'a"b': "x"}, "object": {"color": {"inner": "red"}},
                "list": {"color": ["red", {"inner": "blue"}]}}
    vectors = encoder.encode_texts(list(metadata))
    docs = [Document(id=doc_id, vector=vector, text=f"item {doc_id}", metadata=meta, content_hash=doc_id)
            for (doc_id, meta), vector in zip(metadata.items(), vectors)]
    store_path = tmp_path / "odd-fields"
    cli_ok("index", str(write_shards(tmp_path / "shards", docs, encoder.signature)), "--store-path", str(store_path))
    client = build_app(store_path=store_path).test_client()

    def found(filters: dict) -> list[str]:
        response = client.post("/v1/search", json={"text": "item", "k": 10, "filters": filters})
        assert response.status_code == 200, response.json
        return sorted(hit["id"] for hit in response.json["hits"])

    assert found({"a\\b": "x"}) == ["slash"]
    assert found({'a"b': "x"}) == ["quote"]
    assert found({"color": "red"}) == ["list"]
    assert found({"color": "blue"}) == []


@pytest.mark.parametrize("fusion", ["minmax", "zscore", "rrf"])
def test_every_fusion_method_ranks_the_concept_first(client, fusion):
    hits = client.post("/v1/search", json={"text": "blue square", "fusion": fusion, "k": 5}).json["hits"]
    assert all((h["metadata"]["color"], h["metadata"]["shape"]) == ("blue", "square") for h in hits), hits


@pytest.mark.parametrize("query", ["small", "large blue star at the bottom"])
def test_pages_show_each_hit_with_the_scores_one_big_page_shows(client, query):
    # A page reaching past the candidates ran one deeper coarse search whose raw scores filled in the
    # window's hits too: a BM25-only hit showed a vector score there and none on a page ending in the window.
    request = {"text": query, "candidates": 20}
    paged = [(h["id"], h["score"], h["scores"]) for page in search_pages(client, request, k=5, limit=30)
             for h in page["hits"]]
    big = client.post("/v1/search", json={**request, "k": 30}).json["hits"]
    assert paged == [(h["id"], h["score"], h["scores"]) for h in big]


def test_rrf_fuses_by_the_documented_weight_over_the_rank_constant_plus_rank(client):
    # The constant (60) was in the code only: neither the API's reference nor `search --help` said it.
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    documented = " ".join(spec["components"]["schemas"]["SearchRequest"]["properties"]["fusion"]["description"].split())
    assert f"rrf: weight / ({RRF_K} + rank), rank counted from 1 in each list" in documented
    assert f"rrf: weight / ({RRF_K} + rank), rank counted from 1 in each list" in " ".join(
        CliRunner().invoke(main, ["search", "--help"]).output.split())
    query = {"text": "blue square", "k": 20, "candidates": 20, "exact": True, "rerank": False}
    ranks = {mode: {h["id"]: rank for rank, h in enumerate(client.post("/v1/search", json={**query, "mode": mode})
                                                          .json["hits"], start=1)} for mode in ("vector", "bm25")}
    fused = client.post("/v1/search", json={**query, "fusion": "rrf", "weights": {"vector": 0.7, "bm25": 0.3}}).json
    for hit in fused["hits"]:
        expected = sum(weight / (RRF_K + ranks[mode][hit["id"]]) for mode, weight in (("vector", 0.7), ("bm25", 0.3))
                       if hit["id"] in ranks[mode])
        assert hit["scores"]["fused"] == pytest.approx(expected, rel=1e-12), hit


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
    assert 'stage="forward"' in text and 'stage="queue_wait"' in text and 'stage="search"' in text


def test_the_rerank_stage_is_timed_and_shown_only_on_searches_the_fine_stage_ranked(app_settings, encoder, tmp_path):
    def timed(stage: str) -> float:
        return REGISTRY.get_sample_value("sidecar_stage_seconds_count", {"stage": stage, "modality": "hybrid",
                                                                          "model": ""}) or 0.0

    # The tiny model stands in for the fine model: a store whose documents hold its vectors as fine vectors.
    embed_corpus(encoder, write_corpus(tmp_path / "corpus", 20, seed=5), tmp_path / "shards", workers=0,
                 fine_encoder=encoder, progress=False)
    with EmbeddedStore(tmp_path / "store") as store:
        index_shards(store, tmp_path / "shards", progress=False)
    for fine_encoder, reranked in ((None, False), (encoder, True)):
        store = EmbeddedStore(tmp_path / "store")
        app = create_app(dataclasses.replace(app_settings, store_path=tmp_path / "store"), encoder=encoder,
                         store=store, fine_encoder=fine_encoder)
        try:
            searches, reranks = timed("search"), timed("rerank")
            body = app.test_client().post("/v1/search", json={"text": "red circle"}).json
            assert body["rerank"] is reranked, body
            assert (timed("search") - searches, timed("rerank") - reranks) == (1, int(reranked))
            # took_ms shows a rerank only where one ran: it showed the reading of the page as one (skipped,
            # rerank off, mode bm25), where it now shows a fetch.
            assert set(body["took_ms"]) == {"encode", "coarse", "fetch"} | ({"rerank"} if reranked else set())
            for unranked in ({"rerank": False}, {"mode": "bm25"}):
                body = app.test_client().post("/v1/search", json={"text": "red circle", **unranked}).json
                assert body["rerank"] is False and set(body["took_ms"]) == {"encode", "coarse", "fetch"}, body
        finally:
            state_of(app).close()


def test_the_latency_budget_of_the_p95_alert_is_a_bucket_bound_of_the_request_histogram_the_app_exports(client):
    # histogram_quantile interpolates inside a bucket: with a bound at the budget, "p95 above it" is exactly "more
    # than 5 % of requests slower than it"; with the next bound above it, requests between the two count as fast.
    rules = yaml.safe_load((Path(sidecar.__file__).parents[1] / "docker/prometheus/alerts.yml").read_text())
    alert = next(rule for group in rules["groups"] for rule in group["rules"]
                 if rule.get("alert") == "SidecarLatencyP95AboveBudget")
    budget = float(alert["expr"].rsplit(">", 1)[1])
    client.post("/v1/search", json={"text": "red circle"})
    scrape = client.get("/metrics").get_data(as_text=True)
    bounds = {float(sample.labels["le"]) for family in text_string_to_metric_families(scrape)
              for sample in family.samples
              if sample.name == "sidecar_request_seconds_bucket" and sample.labels["endpoint"] == "/v1/search"}
    assert budget in bounds, sorted(bounds)


def test_readyz_answers_an_unreachable_store_in_the_openapi_files_not_ready_shape_with_the_pid(app, monkeypatch):
    def unreachable():
        raise ConnectionError("connection refused")

    monkeypatch.setattr(state_of(app).store, "count", unreachable)
    answer = app.test_client().get("/readyz")
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    schema = spec["paths"]["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert answer.status_code == 503 and "store embedded unavailable: connection refused" in answer.json["reason"]
    jsonschema.validate(answer.json, schema)
    assert set(answer.json) == set(schema["properties"]) and answer.json["pid"] == os.getpid()


def test_with_a_fine_model_each_encoder_counts_its_encodes_under_its_own_model_label(app_settings, encoder):
    def scrape() -> dict:
        text = client.get("/metrics").get_data(as_text=True)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # The tiny model stands in for the fine model: a second encoding service in the same worker.
    store = EmbeddedStore(app_settings.store_path)
    app = create_app(app_settings, encoder=encoder, store=store, fine_encoder=encoder)
    client = app.test_client()
    try:
        before = scrape()
        assert client.post("/v1/embeddings", json={"input": ["a query for the coarse model"]}).status_code == 200
        state_of(app).fine_encoding.encode_texts(["a query for the fine model"])
        after = scrape()
        for model in ("coarse", "fine"):
            assert added("sidecar_batch_size_count", modality="text", model=model) == 1, model
            assert added("sidecar_stage_seconds_count", stage="forward", modality="text", model=model) == 1, model
            assert added("sidecar_forward_cpu_seconds_total", modality="text", model=model) > 0, model
            assert added("sidecar_text_cache_lookups_total", result="miss", model=model) == 1, model
            assert ("sidecar_queue_depth", (("modality", "text"), ("model", model))) in after, model
        forward = {row["model"]: row["count"] for row in client.get("/v1/status").json["stages"]
                   if row["stage"] == "forward" and row["modality"] == "text"}
        assert forward == {"coarse": 1, "fine": 1}
    finally:
        state_of(app).close()


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
        # An empty string was embedded (the start and end tokens' vector); OpenAI's API refuses it.
        ("/v1/embeddings", {"input": ""}, 400, "field 'input' is an empty string: each input must be non-empty"),
        ("/v1/embeddings", {"input": ["red", ""]}, 400, "field 'input[1]' is an empty string"),
        ("/v1/embeddings", {"input": ["red", {"text": ""}]}, 400, "field 'input[1].text' is an empty string"),
        ("/v1/classify", {"set": "shapes", "input": [""], "modality": "text"}, 400,
         "field 'input[0]' is an empty string"),
        ("/v1/search", {}, 400, "send field 'text' (not blank within its first 4096 characters, max_text_chars), "
                                "field 'image'"),
        ("/v1/search", {"text": "red", "mode": "semantic"}, 400, "field 'mode' must be one of vector, bm25, hybrid"),
        ("/v1/search", {"text": "red", "k": 0}, 400, "field 'k' must be between 1 and 1000"),
        ("/v1/search", {"text": "red", "k": 1001}, 400, "field 'k' must be between 1 and 1000 (max_k), got 1001"),
        ("/v1/search", {"text": "red", "candidates": 1001}, 400,
         "field 'candidates' must be between 1 and 1000 (max_k), got 1001"),
        ("/v1/search", {"text": "red", "offset": 1000}, 400,
         "field 'offset' must be between 0 and 999 (max_k - 1), got 1000"),
        ("/v1/captions", {"like": "item-000001", "k": 1001}, 400,
         "field 'k' must be between 1 and 1000 (max_k), got 1001"),
        ("/v1/captions", {"like": "item-000001", "candidates": 1001}, 400,
         "field 'candidates' must be between 1 and 1000 (max_k), got 1001"),
        ("/v1/classify", {"set": "shapes", "input": "red", "modality": "text", "k": 1001}, 400,
         "field 'k' must be between 1 and 1000 (max_k), got 1001"),
        ("/v1/search", {"text": "red", "k": "ten"}, 400, "field 'k' must be an integer"),
        ("/v1/search", {"text": "red", "k": True}, 400, "field 'k' must be an integer"),
        ("/v1/search", {"image": png_b64(), "mode": "bm25"}, 400, "field 'text' is required for mode bm25"),
        # Was ranked by the text alone, the image ignored without a word (no fine stage reads it here).
        ("/v1/search", {"text": "red", "image": png_b64(), "mode": "bm25"}, 400,
         "field 'image': mode bm25 ranks by the text alone: the query image is read only by the fine stage"),
        ("/v1/search", {"text": "red", "like": "item-000001", "mode": "bm25"}, 400,
         "field 'like': mode bm25 ranks by the text alone"),
        ("/v1/search", {"text": "red", "fusion": "max"}, 400, "field 'fusion' must be one of minmax, zscore, rrf"),
        ("/v1/search", {"text": "red", "weights": {"vector": -1}}, 400,
         "field 'weights.vector' must be a number between 0 and 100"),
        ("/v1/search", {"text": "red", "filters": {"color": {}}}, 400, "field 'filters.color'"),
        ("/v1/search", {"text": "red", "image": "not base64!"}, 400, "field 'image' is not valid base64"),
        ("/v1/search", {"text": "red", "ef_search": None}, 400, "field 'ef_search' must be an integer, got null"),
        ("/v1/search", {"text": "red", "ef_search": 0}, 400, "field 'ef_search' must be between 1 and 4096"),
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


def test_a_compressed_body_answers_415_naming_its_content_encoding(client):
    response = client.post("/v1/embeddings", data=gzip.compress(b'{"input": "a"}'), content_type="application/json",
                           headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415
    assert response.json["error"]["message"] == "Content-Encoding 'gzip' is not accepted: send the body uncompressed"
    identity = client.post("/v1/embeddings", json={"input": "a"}, headers={"Content-Encoding": "identity"})
    assert identity.status_code == 200


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"input": "caf\xe9"}', "request body is not UTF-8 text (byte 0xe9 at offset 14): JSON is sent as UTF-8"),
    (b'{"input": "a", "dimensions": 1' + b"0" * 5000 + b"}",
     "request body holds an integer of more than 4300 digits; no field takes one that long"),
], ids=["latin-1", "5001-digits"])
def test_a_body_python_cannot_read_is_refused_saying_what_the_client_sent(client, raw, message):
    # Not Python's messages: "'utf-8' codec can't decode ..." and "use sys.set_int_max_str_digits() to increase
    # the limit", which advised a change to the server's code.
    response = client.post("/v1/embeddings", data=raw, content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["message"] == message


# ---- no 500 from any input: what used to crash, each answered 4xx naming the field -------------

def post_raw(client, path: str, raw: str):
    """A body as typed: JSON that json= cannot produce (lone surrogates, NaN, deep nesting)."""
    return client.post(path, data=raw.encode("utf-8", "surrogatepass"), content_type="application/json")


@pytest.mark.parametrize(
    ("path", "raw", "status", "message"),
    [
        ("/v1/embeddings", '{"input": ["ok", "red \\ud800"]}', 400, "field 'input[1]' holds a lone surrogate"),
        ("/v1/embeddings", '{"input": [{"text": "\\udfff"}]}', 400, "field 'input[0].text' holds a lone surrogate"),
        ("/v1/search", '{"text": "red \\udc00 circle"}', 400, "field 'text' holds a lone surrogate"),
        ("/v1/search", '{"text": "red", "filters": {"\\ud800": "x"}}', 400,
         "field 'filters' has a key with a lone surrogate"),
        ("/v1/search", '{"text": "red", "filters": {"color": "\\ud800"}}', 400,
         "field 'filters.color' holds a lone surrogate"),
        ("/v1/search", '{"text": "red", "filters": {"size": NaN}}', 400, "field 'filters.size' is nan"),
        ("/v1/search", '{"text": "red", "filters": {"size": [1, Infinity]}}', 400, "field 'filters.size[1]' is inf"),
        ("/v1/search", '{"text": "red", "filters": {"size": -1e999}}', 400, "field 'filters.size' is -inf"),
        ("/v1/search", '{"text": "red", "weights": {"vector": NaN}}', 400, "field 'weights.vector' is nan"),
        ("/v1/search", "[" * 50_000 + "]" * 50_000, 400, "nests deeper than 32 levels (max_json_depth)"),
        ("/v1/search", '{"text": "red", "filters": {"a": ' + "[" * 40 + "]" * 40 + "}}", 400,
         "nests deeper than 32 levels (max_json_depth)"),
        ("/v1/search", '{"text": "red", "filters": {"": "x"}}', 400, "field 'filters' has a key ''"),
        ("/v1/search", '{"text": "red", "filters": {"a\\u0000b": "x"}}', 400, "field 'filters' has a key 'a\\x00b'"),
        ("/v1/search", json.dumps({"text": "red", "filters": {f"f{i}": "x" for i in range(2000)}}), 413,
         "2000 fields, over the limit of 64 (max_filter_fields)"),
        ("/v1/search", json.dumps({"text": "red", "filters": {"color": [f"c{i}" for i in range(2000)]}}), 413,
         "more than 1024 values (max_filter_values)"),
        ("/v1/search", json.dumps({"text": "red", "filters": {"size": 2**63}}), 400,
         "field 'filters.size' is 9223372036854775808, outside the 64-bit integers"),
        ("/v1/search", json.dumps({"text": "red", "filters": {"size": [1, -2**63 - 1]}}), 400,
         "field 'filters.size[1]' is -9223372036854775809, outside the 64-bit integers"),
        ("/v1/search", json.dumps({"text": "red", "filters": {"size": [[1]]}}), 400,
         "field 'filters.size[0]' must be a string, number or boolean, got a list"),
        ("/v1/embeddings", json.dumps({"input": [{"text": None}]}), 400, "field 'input[0].text' must be a string"),
        ("/v1/embeddings", json.dumps({"input": [{"text": "a", "image": "b"}]}), 400, "carries both 'text' and 'image'"),
        ("/v1/search", json.dumps({"text": "red", "filter": {"color": "red"}}), 400,
         "unknown field 'filter' in the request body; it takes text, image, mode"),
    ],
    ids=["surrogate-input", "surrogate-item", "surrogate-text", "surrogate-filter-key", "surrogate-filter-value",
         "nan-filter", "infinity-filter", "overflow-to-inf", "nan-weight", "nested-50k", "nested-40",
         "empty-key", "nul-key", "2000-keys", "2000-values", "above-2**63", "below--2**63",
         "nested-filter-value", "null-item", "two-kind-item", "unknown-field"],
)
def test_input_that_used_to_answer_500_answers_4xx_naming_the_field(client, path, raw, status, message, caplog):
    response = post_raw(client, path, raw)
    assert response.status_code == status, response.json
    assert message in response.json["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's mistake"


@pytest.mark.parametrize("path", ["/v1/search", "/v1/captions"])
def test_a_filter_on_a_field_no_document_holds_answers_400_naming_it_and_the_fields_held(client, corpus, path):
    # It matched nothing: 200 with no hits, as if the misspelt field's value were rare. A name SQLite's JSON
    # path would read as syntax ("a.b c$[0]*") reaches the check, not a 5xx.
    query = {"text": "red"} if path == "/v1/search" else {"like": manifest_rows(corpus)[0]["id"]}
    response = client.post(path, json={**query, "filters": {"colour": "red", "a.b c$[0]*": ["x", 1, 2.5, True]}})
    assert response.status_code == 400, response.json
    assert response.json["error"]["message"] == (
        "field 'filters': no stored document holds metadata fields 'colour', 'a.b c$[0]*'; the fields they hold: "
        "color, position, shape, size")


LONG_KEY = "k" * 70_000


@pytest.mark.parametrize("raw, path", [
    ('{"text": "red", "filters": {"%s": []}}' % LONG_KEY, f"filters.{LONG_KEY}"),
    ('{"text": "red", "filters": {"%s": [null]}}' % LONG_KEY, f"filters.{LONG_KEY}[0]"),
    ('{"text": "red", "filters": {"%s": NaN}}' % LONG_KEY, f"filters.{LONG_KEY}"),
    ('{"text": "red", "filters": {"%s": %s1%s}}' % (LONG_KEY, "[" * 40, "]" * 40), f"filters.{LONG_KEY}" + "[0]" * 30),
    ('{"text": "red", "filters": {"%s": {"\\ud800": 1}}}' % LONG_KEY, f"filters.{LONG_KEY}"),
    ('{"text": "red", "filters": {"%s": "x"}}' % LONG_KEY, LONG_KEY),  # a field no document holds
], ids=["empty-list", "null-item", "nan", "nested-deeper", "surrogate-key", "unknown-field"])
def test_a_70000_character_filter_key_is_echoed_by_its_first_200_characters_and_its_length_not_whole(client, raw,
                                                                                                    path):
    # Each of these 400s held all 70,000 characters of the key.
    response = post_raw(client, "/v1/search", raw)
    message = response.json["error"]["message"]
    assert response.status_code == 400 and len(message) < 600, (response.status_code, len(message))
    assert f"{path[:200]!r} (the first 200 of its {len(path)} characters)" in message


def test_a_filter_value_no_document_holds_in_a_held_field_is_no_error_but_no_hits(client):
    response = client.post("/v1/search", json={"text": "red", "filters": {"color": "chartreuse"}})
    assert response.status_code == 200 and response.json["hits"] == []


def test_a_filter_none_of_whose_values_is_of_a_type_its_field_holds_answers_400_naming_it_as_opensearch_does(
        build_app, encoder, tmp_path):
    # The embedded store matched a value against stored values of its own JSON type: a word for a field of numbers
    # matched nothing and answered 200 with no hits, where OpenSearch refuses it 400 naming `filters`; and a word
    # OpenSearch reads as the number ("2020") was refused where OpenSearch finds the document.
    metadata = {"n2020": {"year": 2020, "mixed": 1, "on_sale": True},
                "n2021": {"year": 2021, "mixed": "one", "on_sale": False}}
    vectors = encoder.encode_texts(list(metadata))
    docs = [Document(id=doc_id, vector=vector, text=f"item {doc_id}", metadata=meta, content_hash=doc_id)
            for (doc_id, meta), vector in zip(metadata.items(), vectors)]
    store_path = tmp_path / "typed-fields"
    cli_ok("index", str(write_shards(tmp_path / "shards", docs, encoder.signature)), "--store-path", str(store_path))
    client = build_app(store_path=store_path, quality_log_dir=str(tmp_path / "quality")).test_client()
    prefix = "field 'filters' does not fit the types of the stored metadata: "
    for filters, held, asked in (({"year": "big"}, "numbers", "text"), ({"year": ["big", True]}, "numbers",
                                 "true or false and text"), ({"on_sale": 1}, "true or false", "numbers"),
                                 ({"on_sale": "yes"}, "true or false", "text")):
        message = (f"{prefix}metadata field {next(iter(filters))!r} holds {held}, its filter's values are {asked} "
                   "that read as none of them, so it can match no document")
        for path, query in (("/v1/search", {"text": "item"}), ("/v1/search", {"text": "item", "mode": "bm25"}),
                            ("/v1/search", {"text": "item", "mode": "vector"}), ("/v1/captions", {"like": "n2020"}),
                            ("/v1/feedback", {"text": "item", "doc_id": "n2020"})):
            response = client.post(path, json={**query, "filters": filters})
            assert response.status_code == 400, (path, query, response.json)
            assert response.json["error"] == {"code": "bad_request", "message": message}, (path, query)

    def found(filters: dict) -> list[str]:
        response = client.post("/v1/search", json={"text": "item", "k": 10, "filters": filters})
        assert response.status_code == 200, response.json
        return sorted(hit["id"] for hit in response.json["hits"])

    # Filters that match today still do: a value of a type the field holds beside one it does not, a field
    # holding numbers in one document and a word in another, and a value of the right type no document holds.
    assert found({"year": ["big", 2020]}) == ["n2020"]
    assert (found({"mixed": 1}), found({"mixed": "one"}), found({"mixed": "two"})) == (["n2020"], ["n2021"], [])
    assert found({"year": 1999}) == [] and found({"on_sale": False}) == ["n2021"]
    # Values as OpenSearch reads them on the field's type: a word for a number or boolean, a number for a word.
    assert found({"year": "2020"}) == found({"year": "2020.0"}) == found({"on_sale": "true"}) == ["n2020"]
    assert found({"year": "2020.5"}) == [] and found({"mixed": "1"}) == ["n2020"]


def test_a_store_error_answers_502_with_the_stores_message_and_no_traceback(build_app, caplog):
    app = build_app()
    state_of(app).store.close()
    response = app.test_client().post("/v1/search", json={"text": "red circle"})
    assert response.status_code == 502, response.json
    assert response.json["error"]["code"] == "store_error" and "closed" in response.json["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info]


# ---- protocol edges ---------------------------------------------------------------------------

def test_405_names_the_allowed_methods(client):
    response = client.get("/v1/search")
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]
    assert "GET" in client.delete("/v1/models").headers["Allow"]


def test_a_405_counts_in_metrics_under_its_paths_route_and_only_a_path_of_no_route_as_unmatched(client):
    def count(endpoint: str, status: str) -> float:
        return REGISTRY.get_sample_value("sidecar_requests_total", {"endpoint": endpoint, "status": status}) or 0.0

    before = (count("/v1/search", "405"), count("/v1/documents/<id:doc_id>/thumbnail", "405"),
              count("unmatched", "404"))
    client.get("/v1/search")
    client.post("/v1/documents/d1/thumbnail")
    client.get("/v1/no-such-path")
    assert (count("/v1/search", "405"), count("/v1/documents/<id:doc_id>/thumbnail", "405"),
            count("unmatched", "404")) == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_mime_wrapped_base64_and_data_urls_are_images(client, corpus):
    path = corpus.parent / manifest_rows(corpus)[0]["path"]
    plain = client.post("/v1/embeddings", json={"input": [image_b64(path)], "modality": "image"}).json
    wrapped = base64.encodebytes(path.read_bytes()).decode("ascii")  # 76-column lines, as `base64` prints
    assert "\n" in wrapped.strip()
    for value in (wrapped, wrapped.replace("\n", "\r\n"), "data:image/jpeg;base64," + wrapped):
        response = client.post("/v1/embeddings", json={"input": [value], "modality": "image"})
        assert response.status_code == 200, response.json
        assert response.json["data"][0]["embedding"] == plain["data"][0]["embedding"]
    response = client.post("/v1/embeddings", json={"input": ["data:text/plain,hello"], "modality": "image"})
    assert response.status_code == 400 and "without ';base64'" in response.json["error"]["message"]


def test_blank_text_beside_an_image_runs_as_an_image_query(client, corpus):
    row = manifest_rows(corpus)[3]
    response = client.post("/v1/search", json={"text": " ", "image": image_b64(corpus.parent / row["path"]), "k": 3})
    assert response.status_code == 200, response.json
    assert response.json["mode"] == "vector" and response.json["hits"][0]["id"] == row["id"]


def test_v1_models_lists_the_served_model_in_openais_shape(client, encoder):
    body = client.get("/v1/models").json
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [(encoder.name, "model", "clip-sidecar")]
    assert isinstance(body["data"][0]["created"], int)
    assert client.get(f"/v1/models/{encoder.name}").json["id"] == encoder.name
    assert client.get("/v1/models/text-embedding-3-small").status_code == 404


def test_a_model_id_with_a_leading_slash_is_refused_by_that_id_not_redirected_to_the_served_one(client, encoder):
    response = client.get(f"/v1/models//{encoder.name}")
    assert response.status_code == 404 and response.json["error"]["code"] == "model_not_found"
    assert f"model '/{encoder.name}' is not served here" in response.json["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1//search"), ("POST", "/v1//embeddings"),
                                              ("GET", "/v1//models"), ("GET", "/v1/prompt-sets//basic")])
def test_a_doubled_slash_is_a_json_404_naming_the_path_not_an_html_redirect(client, method, path):
    # werkzeug merged the slashes and answered a 308 with an HTML page; a POST client that follows it
    # resends its body to a path it never asked for.
    response = client.open(path, method=method, json={"text": "red", "input": "red"})
    assert (response.status_code, response.mimetype) == (404, "application/json"), response.data[:200]
    assert "Location" not in response.headers
    assert response.json["error"] == {"code": "not_found", "message": f"no route for '{path}': the paths are in "
                                                                      "/openapi.yaml"}


def test_every_route_refuses_a_query_parameter_it_does_not_take_and_a_repeated_one_naming_it(app):
    # The thumbnail (and every route but /v1/facets) ignored any query string; /v1/facets read `?size=1&size=2`
    # as size 1. The check runs before the view, so a route's path placeholders need no real value.
    client = app.test_client()
    documented = {re.sub(r"\{[^}]+\}", "x", path): operations
                  for path, operations in yaml.safe_load(client.get("/openapi.yaml").data)["paths"].items()}
    pins = ("model", "weights")  # a connector URL's (ml-commons)
    declared = {"/v1/facets": ("size",), "/v1/opensearch/embeddings/texts": pins,
                "/v1/opensearch/embeddings/text-image": pins, "/v1/opensearch/rerank/ids": (*pins, "index"),
                "/v1/opensearch/rerank/texts": pins, "/v1/opensearch/rerank/images": pins}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<[^>]+>", "x", rule.rule)
        if path == "/":
            continue  # the page answers any query string (test_a_link_to_the_page_with_a_tracker_s_query_string_…)
        method = "GET" if "GET" in rule.methods else "POST"
        response = client.open(f"{path}?bogus=1", method=method, json={})
        assert response.status_code == 400, (path, response.status_code)
        # Documented, as every answer is (the GET paths that take no parameters listed none).
        assert "400" in documented[path][method.lower()]["responses"], path
        takes = f"it takes {', '.join(declared[path])}" if path in declared else "this path takes none"
        assert response.json["error"]["message"] == f"unknown query parameter 'bogus'; {takes}", path
    repeated = client.get("/v1/facets?size=1&size=2")
    assert repeated.status_code == 400
    assert repeated.json["error"]["message"] == "query parameter 'size' is given 2 times: send it once"


def test_every_post_route_that_refuses_a_body_not_sent_as_json_documents_its_415(app):
    # /v1/opensearch/embeddings/texts answered 415 (json_body) without listing it, unlike the other connector URLs.
    client = app.test_client()
    documented = {re.sub(r"\{[^}]+\}", "x", path): operations
                  for path, operations in yaml.safe_load(client.get("/openapi.yaml").data)["paths"].items()}
    refusing = []
    for rule in app.url_map.iter_rules():
        if "POST" not in rule.methods:
            continue
        path = re.sub(r"<[^>]+>", "x", rule.rule)
        if client.post(path, data='{"input": ["a"]}', content_type="text/plain").status_code == 415:
            refusing.append(path)
            assert "415" in documented[path]["post"]["responses"], path
    assert "/v1/opensearch/embeddings/texts" in refusing and "/v1/search" in refusing


def test_a_link_to_the_page_with_a_tracker_s_query_string_opens_the_page(app):
    client = app.test_client()
    response = client.get("/?utm_source=newsletter&fbclid=x&fbclid=y")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert client.get("/static/page.js?v=2").status_code == 400  # the page's own files still take none


@pytest.mark.parametrize(("path", "methods"), [("/v1/search", {"POST", "OPTIONS"}),
                                               ("/v1/documents/item-000001/thumbnail", {"GET", "HEAD", "OPTIONS"}),
                                               ("/healthz", {"GET", "HEAD", "OPTIONS"})])
def test_options_answers_204_listing_the_paths_methods_in_allow_without_a_body(client, path, methods):
    # Flask's own answer was a 200 with an empty body labelled text/html.
    response = client.options(path)
    assert response.status_code == 204 and response.data == b"" and "Content-Type" not in response.headers
    assert set(response.headers["Allow"].split(", ")) == methods
    unknown = client.options("/v1/nothing")
    assert (unknown.status_code, unknown.json["error"]["code"]) == (404, "not_found")


def test_dimensions_other_than_the_models_answer_400(client, encoder):
    response = client.post("/v1/embeddings", json={"input": "red", "dimensions": 32})
    assert response.status_code == 400
    assert f"vectors have {encoder.dim}" in response.json["error"]["message"]
    assert "Matryoshka" in response.json["error"]["message"]
    same = client.post("/v1/embeddings", json={"input": "red", "dimensions": encoder.dim})
    assert same.status_code == 200 and len(same.json["data"][0]["embedding"]) == encoder.dim


# ---- budgets: every request bounded before its work starts ------------------------------------

def png_bytes(size, colour=(255, 0, 0)) -> bytes:
    return base64.b64decode(png_b64(colour, size))


def test_the_requests_pixel_total_is_checked_before_any_image_is_decoded(build_app):
    app = build_app(max_request_pixels=5000)
    budget = state_of(app).encoding.decode_memory
    images = [png_b64(size=(64, 64)), png_b64(size=(64, 64))]  # 4096 pixels each
    # With the decode budget all taken, any decode would wait and answer 503: a 413 shows that
    # the total was refused from the headers alone.
    with budget.reserve(budget.capacity, timeout_s=0):
        response = app.test_client().post("/v1/embeddings", json={"input": images, "modality": "image"})
    assert response.status_code == 413, response.json
    assert ("field 'input[1]': the request's images hold 8192 pixels up to this one, over the limit of 5000 "
            "(max_request_pixels)") in response.json["error"]["message"]
    assert app.test_client().post("/v1/embeddings", json={"input": images[:1], "modality": "image"}).status_code == 200


def test_decodes_wait_for_the_workers_memory_budget_then_answer_503(build_app):
    app = build_app(request_timeout_s=0.2)
    budget = state_of(app).encoding.decode_memory
    with budget.reserve(budget.capacity, timeout_s=0):
        response = app.test_client().post("/v1/search", json={"image": png_b64(), "k": 1})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "memory budget (decode_memory_bytes=" in response.json["error"]["message"]
    assert budget.held == 0
    assert app.test_client().post("/v1/search", json={"image": png_b64(), "k": 1}).status_code == 200


def test_an_image_needing_more_than_the_decode_budget_answers_413(build_app):
    app = build_app(decode_memory_bytes=100_000)
    response = app.test_client().post("/v1/search", json={"image": png_b64(size=(128, 128))})
    assert response.status_code == 413
    assert "over the limit of 100000 (decode_memory_bytes)" in response.json["error"]["message"]


def test_an_extreme_aspect_ratio_is_refused_before_the_resize(client):
    # 4 x 4,000: within max_image_pixels, but a shortest-side resize would make it N x 1000·N.
    response = client.post("/v1/search", json={"image": png_b64(size=(4, 4000))})
    assert response.status_code == 413, response.json
    assert "over the limit of 8192 pixels a side (max_resized_side)" in response.json["error"]["message"]


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_its_decode(client):
    # Each scan is a pass over the whole image: repeating a 14-byte one is a CPU bomb.
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG", progressive=True)
    jpeg = buffer.getvalue()
    last = jpeg.rindex(b"\xff\xda")
    bomb = jpeg[:last] + jpeg[last:-2] * 200 + jpeg[-2:]
    response = client.post("/v1/embeddings", json={"input": [base64.b64encode(bomb).decode()], "modality": "image"})
    assert response.status_code == 413, response.json
    assert ("field 'input[0]': progressive JPEG of 209 scans, over the limit of 100 (max_jpeg_scans)"
            in response.json["error"]["message"])


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"


def test_only_allowed_formats_reach_a_decoder(client, build_app):
    response = client.post("/v1/search", json={"image": base64.b64encode(EPS).decode()})
    assert response.status_code == 415
    assert "EPS is not an accepted image format (image_formats: JPEG, PNG" in response.json["error"]["message"]
    jpeg_only = build_app(image_formats=("JPEG",)).test_client()
    response = jpeg_only.post("/v1/search", json={"image": png_b64()})
    assert response.status_code == 415
    assert "PNG is not an accepted image format (image_formats: JPEG)" in response.json["error"]["message"]


def random_words(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(chr(97 + c) for c in rng.integers(0, 26, 7)) for _ in range(n)]


def test_text_is_cut_to_max_text_chars_before_tokenising(build_app, encoder):
    client = build_app(max_body_bytes=4 * 1024 * 1024).test_client()
    long_text = " ".join(random_words(50_000))  # 400 kB of unique words
    cache_before = len(encoder.tokenizer.cache)
    response = client.post("/v1/embeddings", json={"input": [long_text, long_text[:4096]]})
    assert response.status_code == 200 and response.json["truncated"] == [0, 1]
    # Only the first 4,096 characters (< 600 words) were tokenised; all 50,000 words used to be.
    assert len(encoder.tokenizer.cache) - cache_before < 600
    vectors = [d["embedding"] for d in response.json["data"]]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_the_deadline_counts_tokenising(build_app, encoder, monkeypatch):
    """Texts are tokenised on the batcher thread, inside the encode the request's deadline covers: a
    tokeniser held past the deadline (an event stands in for a slow one; a real one is too fast to
    outlast any deadline reliably) answers 504."""
    release = threading.Event()
    prepare = encoder.prepare_texts

    def slow_prepare(texts):
        release.wait(timeout=10)
        return prepare(texts)

    monkeypatch.setattr(encoder, "prepare_texts", slow_prepare)
    text = " ".join(random_words(8, seed=17))  # in no cache
    try:
        response = build_app(request_timeout_s=0.05).test_client().post("/v1/embeddings", json={"input": [text]})
    finally:
        release.set()
    assert response.status_code == 504
    assert "text encode took longer than request_timeout_s=0.05" in response.json["error"]["message"]


# ---- the OpenAPI file describes what the server takes -----------------------------------------

def openapi_examples():
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            for name, example in content.get("examples", {}).items():
                yield pytest.param(method, path, example["value"], id=f"{method} {path} {name}")


@pytest.mark.parametrize(("method", "path", "body"), list(openapi_examples()))
def test_every_example_in_the_openapi_file_is_served(build_app, tmp_path, method, path, body):
    # With the quality logs on: /v1/feedback answers 404 not_enabled where they are off.
    client = build_app(quality_log_dir=str(tmp_path / "quality")).test_client()
    response = client.open(path, method=method.upper(), json=body)
    assert response.status_code == 200, response.json


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/search", lambda text: {"text": text}),
    ("/v1/opensearch/rerank/texts", lambda text: {"query": text, "documents": ["red circle"]}),
    ("/v1/opensearch/embeddings/texts", lambda text: {"input": ["blue square", text]}),
    ("/v1/feedback", lambda text: {"text": text, "doc_id": "item-000001"})])
def test_the_openapi_file_calls_a_query_blank_within_max_text_chars_blank_as_the_server_does(build_app, tmp_path,
                                                                                             path, body):
    # The server ranks by a query's first max_text_chars characters (4096, the file states the default):
    # blank within them is blank, whatever follows; the file's pattern used to accept it.
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": spec["components"]})
    client = build_app(quality_log_dir=str(tmp_path / "quality")).test_client()
    limit = Settings().max_text_chars
    for blanks, served in ((limit - 1, True), (limit, False)):
        sent = body(" \u3000\t" * (blanks // 3) + " " * (blanks % 3) + "red circle")
        answer = client.post(path, json=sent)
        assert (validator.is_valid(sent), answer.status_code == 200) == (served, served), (blanks, answer.json)
        assert served or answer.status_code == 400


def test_the_served_openapi_file_is_the_packaged_one(client):
    served = client.get("/openapi.yaml")
    assert served.mimetype == "application/yaml"
    assert served.get_data(as_text=True) == (Path(sidecar.__file__).parent / "openapi.yaml").read_text()
