"""The endpoints ml-commons calls (sidecar.api.opensearch_native), driven through the real app with
the bodies OpenSearch 2.19.1 sends (docs/opensearch.md, "What OpenSearch sends"): one call shape
per URL, exactly one vector per document, a float score for every rerank document, and the
throttling header that makes ml-commons retry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import sidecar
from sidecar.api.state import state_of
from sidecar.config import Settings
from tests.support import image_b64, png_b64

TEXTS = "/v1/opensearch/embeddings/texts"
TEXT_IMAGE = "/v1/opensearch/embeddings/text-image"


def manifest_rows(corpus):
    return [json.loads(line) for line in corpus.read_text().splitlines()]


def corpus_image(corpus, index: int = 0) -> str:
    return image_b64(corpus.parent / manifest_rows(corpus)[index]["path"])


def embeddings(client, inputs, **extra) -> np.ndarray:
    response = client.post("/v1/embeddings", json={"input": inputs, **extra})
    assert response.status_code == 200, response.json
    return np.array([d["embedding"] for d in response.json["data"]])


def vectors_of(response) -> np.ndarray:
    assert response.status_code == 200, response.json
    return np.array([d["embedding"] for d in response.json["data"]])


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.json
    return response.json["error"]["message"]


# ---- embeddings: texts ---------------------------------------------------------------------

def test_a_batch_of_texts_gets_one_vector_each_in_order_as_v1_embeddings(client):
    texts = ["red circle", "a", "blue square on the left", "green star"]  # text_embedding sends them sorted by length
    got = vectors_of(client.post(TEXTS, json={"input": texts}))
    np.testing.assert_allclose(got, embeddings(client, texts), atol=1e-6)


def test_a_null_or_an_image_on_the_texts_url_answers_400_naming_the_text_image_url(client, corpus):
    message = error_of(client.post(TEXTS, json={"input": [None, corpus_image(corpus)]}), 400)
    assert "field 'input[0]' is null" in message and TEXT_IMAGE in message
    message = error_of(client.post(TEXTS, json={"input": ["red circle", corpus_image(corpus)]}), 400)
    assert "field 'input[1]' is a base64 JPEG image" in message and TEXT_IMAGE in message
    # MIME-wrapped base64 and data URLs are images too; ordinary texts are texts, base64-looking words included.
    wrapped = "\n".join(corpus_image(corpus)[i:i + 76] for i in range(0, 400, 76))
    assert error_of(client.post(TEXTS, json={"input": [wrapped]}), 400).startswith("field 'input[0]' is a base64 JPEG")
    assert "data URL" in error_of(client.post(TEXTS, json={"input": ["data:image/png;base64," + png_b64()]}), 400)
    assert client.post(TEXTS, json={"input": ["sneakers", "abcdABCD1234xyzw", "QkAAAAAAAAAAAAAAAA"]}).status_code == 200


# ---- embeddings: one document, [text or null, image] ----------------------------------------

@pytest.mark.parametrize("text", ["", "   ", "\u00a0\u3000", " " * 4096 + "red"])
def test_an_empty_or_blank_text_on_the_texts_url_answers_400_naming_its_place(client, text):
    # Before, it was embedded as "": the vector of the start and end tokens alone, the same for every blank text.
    message = error_of(client.post(TEXTS, json={"input": ["red circle", "blue square", text]}), 400)
    assert message.startswith("field 'input[2]' is blank (within its first 4096 characters, max_text_chars")


def test_image_only_document_gets_exactly_the_image_vector_of_v1_embeddings(client, corpus):
    image = corpus_image(corpus)
    got = vectors_of(client.post(TEXT_IMAGE, json={"input": [None, image], "model": "ignored"}))
    assert got.shape[0] == 1  # ml-commons stores the first vector: there is only that one
    np.testing.assert_allclose(got[0], embeddings(client, [image], modality="image")[0], atol=1e-6)


def test_text_and_image_are_fused_by_the_normalised_sum_of_their_vectors(client, corpus):
    image = corpus_image(corpus)
    got = vectors_of(client.post(TEXT_IMAGE, json={"input": ["red circle", image]}))
    text_vector = embeddings(client, ["red circle"])[0]
    image_vector = embeddings(client, [image], modality="image")[0]
    fused = (text_vector + image_vector) / np.linalg.norm(text_vector + image_vector)
    assert got.shape[0] == 1
    np.testing.assert_allclose(got[0], fused, atol=1e-5)
    # A blank text beside the image is the image alone, as in /v1/search.
    np.testing.assert_allclose(vectors_of(client.post(TEXT_IMAGE, json={"input": [" ", image]}))[0], image_vector,
                               atol=1e-6)


def test_a_text_alone_gets_its_text_vector(client):
    got = vectors_of(client.post(TEXT_IMAGE, json={"input": ["red circle"]}))
    np.testing.assert_allclose(got, embeddings(client, ["red circle"]), atol=1e-6)


def test_a_cut_text_is_listed_in_truncated_and_counted_in_usage_as_on_the_texts_url(client, corpus):
    long = "red circle " * 2000  # over max_text_chars and the model's context
    texts = client.post(TEXTS, json={"input": [long]}).json
    for inputs in ([long], [long, corpus_image(corpus)]):
        answer = client.post(TEXT_IMAGE, json={"input": inputs}).json
        assert answer["truncated"] == [0] and answer["usage"] == texts["usage"], answer["usage"]
    short = client.post(TEXT_IMAGE, json={"input": ["red circle"]}).json
    assert short["truncated"] == [] and short["usage"]["prompt_tokens"] > 0
    image_only = client.post(TEXT_IMAGE, json={"input": [None, corpus_image(corpus)]}).json
    assert image_only["truncated"] == [] and image_only["usage"]["prompt_tokens"] == 0


@pytest.mark.parametrize(("inputs", "status", "message", "names_texts_url"), [
    (["red circle", "blue square", "green star"], 400, "field 'input' has 3 items: this URL takes one document", True),
    (["red circle", "blue square"], 400, "field 'input[1]' is not valid base64", True),
    (["red circle", "sneakers"], 415, "field 'input[1]': not a recognised image format", True),
    ([None], 400, "field 'input[0]' is null: this URL takes one document", False),
    ([None, None], 400, "field 'input[1]' must be a base64 image, got null", False),
    ([5, None], 400, "field 'input[0]' must be a text or null, got an integer", False),
    ([], 400, "field 'input' is empty", False),
])
def test_anything_but_one_document_answers_4xx_naming_the_field(client, inputs, status, message, names_texts_url):
    answer = error_of(client.post(TEXT_IMAGE, json={"input": inputs}), status)
    assert message in answer
    assert (TEXTS in answer) == names_texts_url  # where texts were sent here, the URL for texts is named


def test_an_image_first_answers_400_rather_than_embedding_its_base64_as_text(client, corpus):
    message = error_of(client.post(TEXT_IMAGE, json={"input": [corpus_image(corpus)]}), 400)
    assert "field 'input[0]' is a base64 JPEG image" in message and "the image second" in message


def test_a_url_pinned_to_another_model_answers_404_naming_the_served_one(client, encoder):
    response = client.post(f"{TEXTS}?model=ViT-L-14", json={"input": ["red circle"]})
    assert "asks for model 'ViT-L-14'" in error_of(response, 404) and encoder.name in response.json["error"]["message"]
    assert error_of(client.post(f"{TEXTS}?model={encoder.name}&weights=other", json={"input": ["a"]}), 404)
    pinned = f"{TEXTS}?model={encoder.name}&weights={encoder.weights}"
    assert client.post(pinned, json={"input": ["a"]}).status_code == 200


def test_a_connector_url_takes_its_pins_once_and_index_only_where_it_reranks_stored_ids(client, encoder):
    pins = f"model={encoder.name}&weights={encoder.weights}"
    assert client.post(f"{TEXTS}?{pins}", json={"input": ["a"]}).status_code == 200
    message = error_of(client.post(f"{TEXTS}?{pins}&model={encoder.name}", json={"input": ["a"]}), 400)
    assert message == "query parameter 'model' is given 2 times: send it once"
    rerank = {"query": "red", "documents": ["red circle"]}
    assert client.post(f"/v1/opensearch/rerank/texts?{pins}", json=rerank).status_code == 200
    message = error_of(client.post(f"/v1/opensearch/rerank/texts?{pins}&index=a", json=rerank), 400)
    assert message == "unknown query parameter 'index'; it takes model, weights"
    # rerank/ids takes the index (and checks it: this sidecar's store is embedded).
    assert "index 'a'" in error_of(client.post(f"/v1/opensearch/rerank/ids?{pins}&index=a", json=rerank), 400)


def test_overload_answers_503_with_the_header_that_makes_ml_commons_retry(build_app, corpus):
    app = build_app(request_timeout_s=0.2)
    budget = state_of(app).encoding.decode_memory
    with budget.reserve(budget.capacity, timeout_s=0):  # every decode waits, then answers 503
        response = app.test_client().post(TEXT_IMAGE, json={"input": [None, corpus_image(corpus)]})
    assert response.status_code == 503 and response.json["error"]["code"] == "overloaded"
    assert response.headers["x-amzn-ErrorType"] == "ThrottlingException"
    # Only this blueprint speaks ml-commons' dialect; a client error carries no such header.
    assert "x-amzn-ErrorType" not in app.test_client().post(TEXT_IMAGE, json={"input": []}).headers


def scraped(client, family_name: str = "sidecar_request_items") -> dict[tuple[str, str, str], float]:
    """/metrics as {(sample name, endpoint, le): value} for one family (the request-size histogram)."""
    families = text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
    return {(s.name, s.labels.get("endpoint", ""), s.labels.get("le", "")): s.value
            for family in families if family.name == family_name for s in family.samples}


def test_request_sizes_are_counted_per_endpoint_in_metrics(client):
    before = scraped(client)
    client.post(TEXTS, json={"input": ["a", "b", "c", "d", "e"]})
    client.post(TEXT_IMAGE, json={"input": ["red circle"]})
    after = scraped(client)

    def added(*key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert added("sidecar_request_items_bucket", TEXTS, "4.0") == 0
    assert added("sidecar_request_items_bucket", TEXTS, "8.0") == 1
    assert added("sidecar_request_items_sum", TEXTS, "") == 5
    assert added("sidecar_request_items_count", TEXT_IMAGE, "") == 1


# ---- rerank ------------------------------------------------------------------------------------

def rerank_answer(client, kind: str, query: str, documents: list[str], **extra) -> dict:
    response = client.post(f"/v1/opensearch/rerank/{kind}", json={"query": query, "documents": documents, **extra})
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert [r["index"] for r in results] == list(range(len(documents)))  # every index once, input order
    assert all(isinstance(r["relevance_score"], float) for r in results)
    # As written: a JSON float (ml-commons refuses an integer), of at most 18 characters (longer ones
    # become BigDecimal there, which its Cohere post-process cannot cast: a 500 for the search).
    written = re.findall(r'"relevance_score":\s*([^,}]+)', response.get_data(as_text=True))
    assert len(written) == len(documents)
    assert all(("." in number or "e" in number) and len(number) <= 18 for number in written), written
    return response.json


def rerank(client, kind: str, query: str, documents: list[str], **extra) -> list[float]:
    return [r["relevance_score"] for r in rerank_answer(client, kind, query, documents, **extra)["results"]]


def test_without_a_fine_model_the_rerank_keeps_the_page_order_and_says_why(client, corpus):
    # As /v1/search without a fine model: no re-scoring, the coarse order (here: the page's own) stands.
    skipped_ids = ("sidecar_rerank_skipped_total", "/v1/opensearch/rerank/ids", "")
    before = scraped(client, "sidecar_rerank_skipped").get(skipped_ids, 0.0)
    pages = (("ids", ["item-000003", "item-000001", "", "item-000002"]), ("texts", ["b", "", "a"]),
             ("images", [corpus_image(corpus, 1), corpus_image(corpus, 0)]))
    for kind, documents in pages:
        answer = rerank_answer(client, kind, "red circle", documents)
        assert answer["rerank_skipped"].startswith("no fine model is configured (SIDECAR_FINE_MODEL)"), answer
        assert "fine_model" not in answer
        scores = [r["relevance_score"] for r in answer["results"]]
        present = [score for score, document in zip(scores, documents) if document]
        assert present == sorted(present, reverse=True) and len(set(present)) == len(present), scores
        assert all(score == -2.0 for score, document in zip(scores, documents) if not document)
    assert scraped(client, "sidecar_rerank_skipped")[skipped_ids] == before + 1


def test_without_a_fine_model_bad_documents_still_answer_4xx(client, build_app):
    # The skipped stage checks its input all the same: a bad page is not answered in its own order.
    images = "/v1/opensearch/rerank/images"
    message = error_of(client.post(images, json={"query": "a", "documents": ["not base64!"]}), 400)
    assert "documents[0]" in message
    # Base64 of bytes that are no image (b"hello"): 415, as with a fine model.
    message = error_of(client.post(images, json={"query": "a", "documents": [png_b64(), "aGVsbG8="]}), 415)
    assert "field 'documents[1]': not a recognised image format" in message
    # Images whose pixels together pass the request's limit: 413 naming it, as /v1/search answers.
    small = build_app(max_request_pixels=5000).test_client()
    page = [png_b64(size=(60, 60)), png_b64(size=(60, 60))]  # 3600 pixels each
    message = error_of(small.post(images, json={"query": "a", "documents": page}), 413)
    assert "field 'documents[1]'" in message and "max_request_pixels" in message


def test_rerank_of_an_unknown_id_answers_400_naming_it_and_the_store_but_not_where_the_store_is(client, store_path):
    response = client.post("/v1/opensearch/rerank/ids", json={"query": "red circle", "documents": ["nope"]})
    message = error_of(response, 400)
    assert "field 'documents[0]': no document with id 'nope' in the sidecar's store (an embedded store)" in message
    response = client.post("/v1/opensearch/rerank/ids?index=clip-sidecar", json={"query": "red", "documents": []})
    second = error_of(response, 400)
    assert "index 'clip-sidecar', but this sidecar's store is an embedded store" in second
    # The connector's key, and OpenSearch users through the rerank processor, learn nothing of the disk.
    assert str(store_path) not in message + second


def test_a_bad_document_after_blank_ones_is_named_by_its_place_in_the_request(client, corpus):
    # Blank documents (hits without the field) are set aside before the others are checked: the error must
    # still name the bad one where the request has it, not where it stands among the non-blank ones.
    response = client.post("/v1/opensearch/rerank/ids", json={"query": "red", "documents": ["", "item-000001", "nope"]})
    assert "field 'documents[2]': no document with id 'nope'" in error_of(response, 400)
    page = ["", " ", corpus_image(corpus), "aGVsbG8="]  # base64 of b"hello": no image
    response = client.post("/v1/opensearch/rerank/images", json={"query": "red", "documents": page})
    assert "field 'documents[3]': not a recognised image format" in error_of(response, 415)


def test_blank_documents_rank_last_and_json_looking_queries_are_text(client):
    scores = rerank(client, "texts", "red circle", ["a red circle", "", "a blue square"])
    assert scores[1] == -2.0 and scores[1] < min(scores[0], scores[2])  # a hit without the field ranks last
    assert rerank(client, "texts", '{"a": 1}', ["x"])


@pytest.mark.parametrize(("body", "message"), [
    ({"documents": ["a"]}, "field 'query' is required"),
    ({"query": " ", "documents": ["a"]}, "field 'query' is blank"),
    # Blank where it is cut (max_text_chars, 4096), as /v1/search refuses such a text: nothing to rank by.
    ({"query": " " * 4096 + "red", "documents": ["a"]}, "field 'query' is blank (within its first 4096 characters"),
    ({"query": "a"}, "field 'documents' is required"),
    ({"query": "a", "documents": ["a", 3]}, "field 'documents[1]' must be a string, got an integer"),
    ({"query": "a", "documents": ["a", "b"], "top_n": 1}, "field 'top_n' is 1, fewer than the 2 documents"),
    ({"query": "a", "documents": ["a"], "rank_fields": ["x"]}, "unknown field 'rank_fields'"),
])
def test_bad_rerank_requests_answer_400_naming_the_field(client, body, message):
    assert message in error_of(client.post("/v1/opensearch/rerank/texts", json=body), 400)


@pytest.mark.parametrize("kind", ["ids", "texts", "images"])
@pytest.mark.parametrize("top_n", [0, -1])
def test_top_n_below_1_answers_400_naming_its_minimum_on_every_rerank_url(client, kind, top_n):
    # An empty page has no document top_n could be fewer than: the minimum is checked of its own.
    response = client.post(f"/v1/opensearch/rerank/{kind}", json={"query": "a", "documents": [], "top_n": top_n})
    assert f"field 'top_n' must be at least 1, got {top_n}" in error_of(response, 400)


def documents_limit_in_the_openapi_file(kind: str) -> int:
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    schema = spec["paths"][f"/v1/opensearch/rerank/{kind}"]["post"]["requestBody"]["content"]["application/json"]
    name = schema["schema"]["$ref"].rsplit("/", 1)[1]
    (limit,) = [part["properties"]["documents"]["maxItems"] for part in spec["components"]["schemas"][name]["allOf"]
                if "maxItems" in part.get("properties", {}).get("documents", {})]
    return limit


def test_each_rerank_urls_schema_allows_as_many_documents_as_the_server_takes(build_app):
    # The file states the settings' defaults: ids are capped at max_k, texts and images at max_batch_items.
    defaults = Settings()
    assert documents_limit_in_the_openapi_file("ids") == defaults.max_k
    assert documents_limit_in_the_openapi_file("images") == defaults.max_batch_items
    limit = documents_limit_in_the_openapi_file("texts")
    client = build_app(max_batch_items=defaults.max_batch_items).test_client()
    texts = [f"text {i}" for i in range(limit + 1)]
    served = client.post("/v1/opensearch/rerank/texts", json={"query": "red", "documents": texts[:limit]})
    assert served.status_code == 200 and len(served.json["results"]) == limit
    refused = client.post("/v1/opensearch/rerank/texts", json={"query": "red", "documents": texts})
    assert "over the limit of 256 (max_batch_items)" in error_of(refused, 413)


def test_rerank_of_an_unknown_kind_is_404(client):
    assert client.post("/v1/opensearch/rerank/vectors", json={"query": "a", "documents": []}).status_code == 404
