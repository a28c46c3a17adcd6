"""OpenSearch calls the sidecar (ml-commons remote models, ingest and search pipelines) on the real node,
with the real sidecar under gunicorn on loopback. The query side is a plain opensearch-py client and the
requests docs/opensearch.md tells users to send: no project code between the test and OpenSearch.

One index, two doors: half the corpus enters through `clip-sidecar embed` + `index`, the other half as
documents with a base64 image through the index's default (ingest) pipeline; both halves answer both
query paths (`neural` / `hybrid` in OpenSearch, /v1/search in the sidecar)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from click.testing import CliRunner, Result
from opensearchpy import OpenSearch, TransportError, helpers

from sidecar.cli import main
from sidecar.ingest.shards import ShardSet
from sidecar.model.synthetic import COLORS, SHAPES, SIZES
from tests.integration.conftest import _client, owned_indices
from tests.integration.native_support import (
    TEXT_IMAGE,
    TEXTS,
    b64,
    bulk,
    cli,
    concept,
    ml_objects,
    opensearch_args,
    pipeline_document,
    printed_json,
    rows,
    scrape,
    sidecar_env,
    store_args,
    unit,
    value,
)
from tests.support import gunicorn_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOOR_SPLIT = 200  # corpus rows before it enter through `clip-sidecar index`, the rest through the pipeline
OVERLAP_QUERIES = ([f"{color} {shape}" for color in COLORS for shape in SHAPES]
                   + [f"{size} {color} circle" for size in SIZES for color in list(COLORS)[:5]])


class Native:
    """The module's world: an alias, its sidecar, and a plain client."""

    def __init__(self, alias: str, sidecar: str, client: OpenSearch, connected: Result):
        self.alias, self.sidecar, self.client, self.connected = alias, sidecar, client, connected

    def search(self, body: dict[str, Any], **params: Any) -> list[dict[str, Any]]:
        return self.client.search(index=self.alias, body=body, params=params)["hits"]["hits"]

    def sidecar_search(self, **body: Any) -> list[dict[str, Any]]:
        response = requests.post(f"{self.sidecar}/v1/search", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["hits"]


@pytest.fixture(scope="module")
def native(node: str, corpus: Path, test_cache_dir: Path, tmp_path_factory) -> Iterator[Native]:
    """An index set up by the CLI, its first half indexed by `embed` + `index`, a sidecar serving it,
    `connect --set-defaults`, then the second half through the default pipeline."""
    alias = f"it-native-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("native")
    client = _client()
    try:
        cli("opensearch", "setup", *opensearch_args(alias))
        first_half = folder / "first-half.jsonl"
        first_half.write_text("".join(json.dumps({**row, "path": str(corpus.parent / row["path"])}) + "\n"
                                      for row in rows(corpus)[:DOOR_SPLIT]))
        cli("embed", str(first_half), "--out", str(folder / "shards"), "--workers", "0")
        assert f"store now holds {DOOR_SPLIT} documents" in cli("index", str(folder / "shards"),
                                                                *store_args(alias)).output
        # Room for what ml-commons sends at once (16 calls of up to 64 texts): no 503 + retry here, so the
        # calls the sidecar counts are exactly those sent (overload has a test of its own).
        env = sidecar_env(alias, folder, test_cache_dir, SIDECAR_QUEUE_ITEMS="1024")
        with gunicorn_server(env, folder / "sidecar.log", threads=32) as url:
            connected = cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--set-defaults")
            world = Native(alias, url, client, connected)
            results = bulk(client, alias, [pipeline_document(corpus, row) for row in rows(corpus)[DOOR_SPLIT:]])
            assert [r["status"] for r in results] == [201] * (len(rows(corpus)) - DOOR_SPLIT), results[:3]
            yield world
    finally:
        CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias), "--disconnect"])
        client.indices.delete(index=owned_indices(alias), ignore_unavailable=True)
        client.close()


# ---- the pipeline door stores the sidecar's vectors --------------------------------------------------

def test_pipeline_documents_store_exactly_the_sidecars_image_vector(native, corpus, shards):
    second = rows(corpus)[DOOR_SPLIT:]
    stored = {d["_id"]: d["_source"] for d in native.client.mget(
        index=native.alias, body={"ids": [r["id"] for r in second]}, _source_includes=["vector", "image"])["docs"]}
    assert all("image" not in source for source in stored.values())  # base64 kept out of _source
    images = [b64(corpus, row) for row in second[:40]]
    served = requests.post(f"{native.sidecar}/v1/embeddings", json={"input": images, "modality": "image"}, timeout=60)
    for row, entry in zip(second[:40], served.json()["data"]):
        cosine = float(unit(stored[row["id"]]["vector"]) @ unit(entry["embedding"]))
        assert cosine >= 0.9999, (row["id"], cosine)
    # The other door's vectors for the same images (the embed job, session shards): the same model and fields.
    embedded = {doc.id: doc.vector for batch in ShardSet(shards).documents() for doc in batch}
    cosines = [float(unit(stored[r["id"]]["vector"]) @ unit(embedded[r["id"]])) for r in second]
    assert min(cosines) >= 0.9999


# ---- queries from a plain client --------------------------------------------------------------------

@pytest.mark.parametrize("query", ["red circle", "blue square", "green star", "yellow triangle"])
def test_neural_query_text_finds_the_concept_at_rank_1(native, query):
    hits = native.search({"size": 1, "_source": ["metadata"],
                          "query": {"neural": {"vector": {"query_text": query, "k": 10}}}})
    assert concept(hits[0]["_source"]) == tuple(query.split())


def test_neural_query_image_finds_the_photo_itself_from_either_door(native, corpus):
    for row in (rows(corpus)[0], rows(corpus)[DOOR_SPLIT]):  # entered by `index`; by the pipeline
        hits = native.search({"size": 1, "_source": ["metadata"],
                              "query": {"neural": {"vector": {"query_image": b64(corpus, row), "k": 10}}}})
        assert hits[0]["_id"] == row["id"] and concept(hits[0]["_source"]) == concept(row)
        assert hits[0]["_score"] == pytest.approx(2.0, abs=1e-3)  # innerproduct score 1 + cosine


def test_both_doors_answer_both_query_paths(native):
    opensearch = {h["_id"] for h in native.search({"size": 60, "_source": False,
                                                    "query": {"neural": {"vector": {"query_text": "red circle",
                                                                                    "k": 60}}}})}
    sidecar = {h["id"] for h in native.sidecar_search(text="red circle", mode="vector", k=60)}
    for found in (opensearch, sidecar):
        doors = {int(doc_id.rsplit("-", 1)[1]) < DOOR_SPLIT for doc_id in found}
        assert doors == {True, False}, found


def test_hybrid_with_rerank_overlaps_the_sidecars_own_hybrid_rerank(native):
    overlaps = []
    for query in OVERLAP_QUERIES:
        ours = [h["id"] for h in native.sidecar_search(text=query, mode="hybrid", k=10, candidates=100, rerank=True)]
        # docs/opensearch.md: the rerank processor reranks the returned page, so ask for the candidates
        # (100) and read the first 10, as /v1/search reranks its 100 candidates.
        theirs = [h["_id"] for h in native.search({
            "size": 100, "_source": ["id"],
            "query": {"hybrid": {"queries": [{"neural": {"vector": {"query_text": query, "k": 100}}},
                                             {"match": {"text": {"query": query}}}]}},
            "ext": {"rerank": {"query_context": {"query_text_path": "query.hybrid.queries.0.neural.vector.query_text"}}},
        }, search_pipeline=f"{native.alias}-hybrid-rerank")][:10]
        overlaps.append(len(set(ours) & set(theirs)) / 10)
    assert len(overlaps) == 50 and float(np.mean(overlaps)) >= 0.8, overlaps


def test_hybrid_through_the_default_pipeline_ranks_as_v1_search_when_its_size_is_the_candidates(native):
    # docs/opensearch.md: the hybrid query min-max normalises each sub-query over its top `size` hits, as
    # /v1/search does over its candidates, so a page of the candidates read to its first k is /v1/search's top k.
    for query in OVERLAP_QUERIES:
        ours = [h["id"] for h in native.sidecar_search(text=query, mode="hybrid", k=10, candidates=100, rerank=False)]
        theirs = [h["_id"] for h in native.search({"size": 100, "_source": False, "query": {"hybrid": {"queries": [
            {"neural": {"vector": {"query_text": query, "k": 100}}}, {"match": {"text": {"query": query}}}]}}})][:10]
        assert theirs == ours, query


def test_hybrid_through_the_default_search_pipeline(native):
    hits = native.search({"size": 5, "_source": ["metadata"], "query": {"hybrid": {"queries": [
        {"neural": {"vector": {"query_text": "blue square", "k": 50}}}, {"match": {"text": "blue square"}}]}}})
    assert [concept(h["_source"]) for h in hits] == [("blue", "square")] * 5
    assert all(0.0 <= h["_score"] <= 1.0 for h in hits)  # normalised and fused, not the sentinel scores


# ---- batching end to end ------------------------------------------------------------------------------

def test_batches_reach_the_sidecar_as_sent_and_concurrent_documents_share_forward_passes(native):
    before = scrape(native.sidecar)
    texts = [{"id": f"text-only-{i}", "text": f"a {color} shape number {i}"} for i, color in
             enumerate(list(COLORS) * 4)]  # 32 text-only documents
    try:
        results = bulk(native.client, native.alias, texts, pipeline=f"{native.alias}-text")
        assert [r["status"] for r in results] == [201] * 32
        model = printed_json(native.connected)["models"]["texts"]
        predicted = native.client.transport.perform_request(
            "POST", f"/_plugins/_ml/_predict/text_embedding/{model}", body={"text_docs": [f"t{i}" for i in range(100)]})
        assert sum(len(r["output"]) for r in predicted["inference_results"]) == 100
    finally:
        helpers.bulk(native.client, ({"_op_type": "delete", "_index": native.alias, "_id": t["id"]} for t in texts),
                     raise_on_error=False, refresh=True)
    after = scrape(native.sidecar)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # text_embedding's batch_size (connect --batch-size 16): 32 documents in 2 calls of 16; the
    # connector's step size (64) splits the 100-text _predict into 64 + 36.
    assert added("sidecar_request_items_count", endpoint=TEXTS) == 4
    assert added("sidecar_request_items_sum", endpoint=TEXTS) == 132
    assert added("sidecar_request_items_bucket", endpoint=TEXTS, le="8.0") == 0
    assert added("sidecar_request_items_bucket", endpoint=TEXTS, le="16.0") == 2
    assert added("sidecar_request_items_bucket", endpoint=TEXTS, le="32.0") == 2
    assert added("sidecar_request_items_bucket", endpoint=TEXTS, le="64.0") == 4
    # The pipeline door (fixture): one call per image document, all of one item...
    images = (value(after, "sidecar_request_items_count", endpoint=TEXT_IMAGE),
              value(after, "sidecar_request_items_bucket", endpoint=TEXT_IMAGE, le="1.0"))
    assert images[0] >= 200 and images[0] == images[1]
    # ...which the micro-batcher ran in shared forward passes: fewer passes than images.
    passes = value(after, "sidecar_batch_size_count", modality="image", model="coarse")
    encoded = value(after, "sidecar_batch_size_sum", modality="image", model="coarse")
    assert encoded >= 200 and passes < encoded


# ---- failures that reach a bulk item ----------------------------------------------------------------

def test_a_bad_image_fails_only_its_document_with_the_sidecars_message(native, corpus):
    good = pipeline_document(corpus, rows(corpus)[0])
    documents = [{**good, "id": "bad-good"}, {**good, "id": "bad-base64", "image": "not base64!"},
                 {**good, "id": "bad-bytes", "image": base64.b64encode(b"plain text, no image").decode()}]
    results = {r["_id"]: r for r in bulk(native.client, native.alias, documents)}
    try:
        assert results["bad-good"]["status"] == 201
        assert results["bad-base64"]["status"] == 400
        assert results["bad-bytes"]["status"] == 415
        for doc_id, message in (("bad-base64", "field 'input[1]' is not valid base64"),
                                ("bad-bytes", "field 'input[1]': not a recognised image format")):
            reason = results[doc_id]["error"]["reason"]
            assert reason.startswith("Error from remote service: ") and message in reason, reason
        found = native.client.mget(index=native.alias, body={"ids": list(results)})["docs"]
        assert [d["found"] for d in found] == [True, False, False]  # nothing half-written
    finally:
        native.client.delete(index=native.alias, id="bad-good", refresh=True)


def test_an_empty_or_blank_text_is_refused_by_neural_search_itself_and_a_missing_one_is_written_without_a_vector(
        native):
    # What docs/opensearch.md tells users of the text pipeline: neural-search refuses "" and "   " before any
    # call (so the sidecar never meets them); a document without the field is written, with no vector.
    before = scrape(native.sidecar)
    documents = [{"id": "empty-text", "text": ""}, {"id": "blank-text", "text": "   "}, {"id": "no-text"}]
    results = {r["_id"]: r for r in bulk(native.client, native.alias, documents, pipeline=f"{native.alias}-text")}
    try:
        for doc_id in ("empty-text", "blank-text"):
            assert results[doc_id]["status"] == 400, results[doc_id]
            assert "map type field [text] has empty string value" in results[doc_id]["error"]["reason"]
        assert results["no-text"]["status"] == 201
        written = native.client.get(index=native.alias, id="no-text")["_source"]
        assert "vector" not in written
        assert value(scrape(native.sidecar), "sidecar_request_items_count", endpoint=TEXTS) == value(
            before, "sidecar_request_items_count", endpoint=TEXTS)
    finally:
        native.client.delete(index=native.alias, id="no-text", refresh=True, ignore=404)


def test_a_predict_with_a_blank_text_fails_with_the_sidecars_400_naming_it_not_a_vector_of_nothing(native):
    # neural-search refuses blank fields before it calls; a direct _predict reaches the sidecar, which embedded
    # "   " as "" (the start and end tokens' vector, one for every blank text).
    model = printed_json(native.connected)["models"]["texts"]
    with pytest.raises(TransportError) as refused:
        native.client.transport.perform_request(
            "POST", f"/_plugins/_ml/_predict/text_embedding/{model}", body={"text_docs": ["red circle", "   "]})
    reason = str(refused.value.info)
    assert refused.value.status_code == 400 and "Error from remote service" in reason, reason
    assert "is blank (within its first 4096 characters, max_text_chars" in reason, reason


# ---- connect: idempotent, and leaves nothing behind ------------------------------------------------------

def test_connect_twice_is_a_no_op(native):
    before = ml_objects(native.client, native.alias)
    again = cli("opensearch", "connect", *opensearch_args(native.alias), "--sidecar-url", native.sidecar, "--set-defaults")
    lines = again.output[:again.output.index("{")].splitlines()
    assert lines and all(line.startswith("unchanged") for line in lines), lines
    assert again.output.rstrip().endswith("(nothing changed)")
    assert printed_json(again) == printed_json(native.connected)
    assert ml_objects(native.client, native.alias) == before
    assert {kind: len(ids) for kind, ids in before.items()} == {
        "connectors": 3, "models": 3, "model_groups": 1, "tasks": 6, "ingest": 2, "search": 2, "templates": 0,
        "settings": 2}


def test_connect_leaves_the_clusters_own_template_for_the_index_in_force_and_removes_an_earlier_connects(native):
    # An operator's template for the index's names (here one setting; in life replicas, an ISM policy). Connect used
    # to put one of priority 100 over it: OpenSearch applies one composable template per new index, so the index a
    # rebuild made lost the operator's settings without a word.
    alias, client = native.alias, native.client
    operators, earlier = f"ops-{alias}", f"{alias}-pipelines"
    client.indices.put_index_template(name=operators, body={
        "index_patterns": [f"{alias}-*"], "priority": 10, "template": {"settings": {"index": {"max_result_window": 20000}}}})
    # What connect made before: found by its name and removed by the next run.
    client.indices.put_index_template(name=earlier, body={
        "index_patterns": [f"{alias}-v*"], "priority": 100,
        "template": {"settings": {"index": {"default_pipeline": f"{alias}-image"}}}})
    probe = f"{alias}-v0"  # named as the index's versions are, but behind no alias: no search reads it
    try:
        again = cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", native.sidecar, "--set-defaults")
        assert f"removed index template {earlier}" in again.output
        assert ml_objects(client, alias)["templates"] == []
        client.indices.create(index=probe)
        settings = client.indices.get_settings(index=probe, flat_settings=True)[probe]["settings"]
        assert settings.get("index.max_result_window") == "20000", settings
    finally:
        client.indices.delete(index=probe, ignore_unavailable=True)
        for template in (operators, earlier):
            client.indices.delete_index_template(name=template, ignore=404)


def test_disconnect_leaves_nothing_behind(native):
    # Last in the module: the fixture's teardown disconnects again, finding nothing.
    result = cli("opensearch", "connect", *opensearch_args(native.alias), "--disconnect")
    # 2 index settings, 4 pipelines, 3 models, 3 connectors, the group
    assert result.output.count("removed ") == 13, result.output
    assert ml_objects(native.client, native.alias) == {
        "connectors": [], "models": [], "model_groups": [], "tasks": [], "ingest": [], "search": [], "templates": [],
        "settings": []}
    assert native.client.count(index=native.alias)["count"] == 400  # the documents stay: only the wiring goes
    again = cli("opensearch", "connect", *opensearch_args(native.alias), "--disconnect")
    assert "(nothing was connected)" in again.output
