"""The trained tiny CLIP, the real CLI and the Flask app on a real OpenSearch node: setup, index,
rerun, rebuild, incremental embed + index, every search mode (native and Python hybrid), filters."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.model.encoder import Encoder
from sidecar.model.synthetic import sample_items
from sidecar.retrieval.search import SearchOptions, search, uses_native_hybrid
from sidecar.stores.opensearch import OpenSearchStore
from tests.integration.conftest import (
    LARGE_CORPUS_ITEMS,
    URL,
    _auth,
    _client,
    cli,
    make_store,
    opensearch_args,
    owned_indices,
    store_args,
)
from tests.support import coarse_depths, search_pages

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUERIES = ("red circle", "blue square", "green star", "yellow triangle")


def concept(hit) -> tuple[str, str]:
    metadata = hit["metadata"] if isinstance(hit, dict) else hit.metadata
    return metadata["color"], metadata["shape"]


def encode_text(encoder: Encoder, text: str) -> np.ndarray:
    return encoder.encode_texts([text])[0]


@pytest.fixture(scope="module")
def large_store(node: str, large_shards: Path) -> Iterator[OpenSearchStore]:
    """The large corpus indexed through the CLI into its own alias, shared by this module's read-only tests."""
    alias = f"it-e2e-large-{uuid.uuid4().hex[:8]}"
    try:
        result = cli("index", str(large_shards), *store_args(alias))
        assert f"store now holds {LARGE_CORPUS_ITEMS} documents" in result.output
        store = make_store(index=alias)
        yield store
        store.close()
    finally:
        client = _client()
        client.indices.delete(index=owned_indices(alias), ignore_unavailable=True)
        client.close()


def test_cli_setup_index_rerun_rebuild_and_search(encoder, shards, alias):
    assert f"OpenSearch index {alias} ready for" in cli("opensearch", "setup", *opensearch_args(alias)).output
    store = make_store(index=alias)
    try:
        assert store.signature() == encoder.signature and store.count() == 0
        result = cli("index", str(shards), *store_args(alias))
        assert "400 written, 0 unchanged, 0 deleted; store now holds 400 documents" in result.output
        result = cli("index", str(shards), *store_args(alias))
        assert "0 written, 400 unchanged, 0 deleted; store now holds 400 documents" in result.output
        before = store.alias_indices()
        assert "store now holds 400 documents" in cli("index", str(shards), "--rebuild", *store_args(alias)).output
        after = store.alias_indices()
        assert len(after) == 1 and after != before and not store.client.indices.exists(index=before[0])
        assert store.count() == 400 and store.signature() == encoder.signature
        hits = json.loads(cli("search", "blue square", *store_args(alias), "-k", "3", "--json").output)
        assert [concept(h) for h in hits] == [("blue", "square")] * 3
        assert {"vector", "bm25", "fused"} <= hits[0]["scores"].keys()  # no fine model: no rerank score
    finally:
        store.close()


@pytest.mark.parametrize("mode, fusion", [("vector", "minmax"), ("bm25", "minmax"), ("hybrid", "minmax"),
                                          ("hybrid", "rrf"), ("hybrid", "zscore")])
def test_every_mode_finds_the_concept(encoder, large_store, mode, fusion):
    for query in QUERIES:
        options = SearchOptions(mode=mode, k=5, fusion=fusion, weights=(0.5, 0.5))
        result = search(large_store, vector=encode_text(encoder, query), text=query, options=options)
        color, shape = query.split()
        assert [concept(h) for h in result.hits] == [(color, shape)] * 5, (query, result.hits)
        if mode == "hybrid":
            # zscore has no OpenSearch pipeline: fused in Python; the others by OpenSearch.
            assert uses_native_hybrid(large_store, options) == (fusion != "zscore")
            assert {"vector", "bm25", "fused"} <= result.hits[0].scores.keys()


def test_image_query_finds_the_same_picture(encoder, large_store, large_corpus):
    records = [json.loads(line) for line in large_corpus.read_text().splitlines()[:3]]
    for record in records:
        with Image.open(large_corpus.parent / record["path"]) as image:
            vector = encoder.encode_images([image.convert("RGB")])[0]
        hits = search(large_store, vector=vector, text=None, options=SearchOptions(mode="vector", k=3)).hits
        assert hits[0].id == record["id"] and hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert concept(hits[0]) == (record["metadata"]["color"], record["metadata"]["shape"])


def test_filters_in_every_mode(encoder, large_store):
    vector = encode_text(encoder, "red circle")
    for mode in ("vector", "bm25", "hybrid"):
        options = SearchOptions(mode=mode, k=10, filters={"color": "blue", "size": ["small"]})
        hits = search(large_store, vector=vector, text="circle", options=options).hits
        assert len(hits) == 10, mode
        assert {(h.metadata["color"], h.metadata["size"]) for h in hits} == {("blue", "small")}, mode
    exact = search(large_store, vector=vector, text=None,
                   options=SearchOptions(mode="vector", k=5, exact=True, filters={"position": "left"})).hits
    assert {h.metadata["position"] for h in exact} == {"left"}


@pytest.mark.parametrize("fusion", ["minmax", "rrf"])
def test_native_and_python_fusion_agree(encoder, large_store, fusion):
    def run(query: str, vector: np.ndarray, *, native: bool, rerank: bool, weights=(0.5, 0.5)):
        options = SearchOptions(mode="hybrid", k=10, candidates=50, fusion=fusion, weights=weights,
                                rerank=rerank, native_hybrid=native)
        assert uses_native_hybrid(large_store, options) is native
        return search(large_store, vector=vector, text=query, options=options).hits

    # Text and vector asking for the same thing: the same concepts, mostly the same ids, before and
    # after the rerank (ties between identical captions may swap), and the same evidence per hit.
    for query in QUERIES:
        vector = encode_text(encoder, query)
        for rerank in (False, True):
            native, python = run(query, vector, native=True, rerank=rerank), run(query, vector, native=False,
                                                                                   rerank=rerank)
            assert [concept(h) for h in native] == [concept(h) for h in python], (query, rerank)
            assert len({h.id for h in native} & {h.id for h in python}) >= 8, (query, rerank)
            python_by_id = {h.id: h for h in python}
            for hit in native:
                other = python_by_id.get(hit.id)
                if other is not None:
                    assert hit.scores["fused"] == pytest.approx(other.scores["fused"], abs=1e-3)
                    if "bm25" in other.scores:
                        assert hit.scores["bm25"] == pytest.approx(other.scores["bm25"], rel=1e-5)
                stored = large_store.fetch([hit.id])[0].vector
                assert hit.scores["vector"] == pytest.approx(float(np.dot(vector, stored)), abs=1e-5)
    # Text and vector disagreeing (disjoint lists, many exact ties): the fused scores agree rank by
    # rank even where tied ids are ordered differently; weights other than 0.5/0.5 for min-max.
    weights = (0.5, 0.5) if fusion == "rrf" else (0.6, 0.4)
    for query, vector_query in (("circle", "blue square"), ("red", "large star"), ("green square", "pink cross")):
        vector = encode_text(encoder, vector_query)
        native = run(query, vector, native=True, rerank=False, weights=weights)
        python = run(query, vector, native=False, rerank=False, weights=weights)
        assert [h.scores["fused"] for h in native] == pytest.approx([h.scores["fused"] for h in python], abs=1e-3)


def test_native_hybrid_takes_the_weights_of_the_request(encoder, large_store):
    # Text asks for red circles, the vector for blue squares: the weights decide who wins.
    vector = encode_text(encoder, "blue square")

    def top(weights: tuple[float, float]) -> set[tuple[str, str]]:
        options = SearchOptions(mode="hybrid", k=5, weights=weights, rerank=False)
        assert uses_native_hybrid(large_store, options)
        return {concept(h) for h in search(large_store, vector=vector, text="red circle", options=options).hits}
    assert top((0.1, 0.9)) == {("red", "circle")}
    assert top((0.9, 0.1)) == {("blue", "square")}


def test_incremental_embed_and_index_show_changes_and_deletions(encoder, tmp_path, alias):
    folder = tmp_path / "photos"
    folder.mkdir()
    for item in sample_items(60, seed=3):
        item.image.save(folder / f"{item.id}.jpg", quality=90)
    out = tmp_path / "shards"
    cli("embed", str(folder), "--out", str(out), "--workers", "0")
    assert "60 written" in cli("index", str(out), *store_args(alias)).output

    files = sorted(folder.glob("*.jpg"))
    for path in files[:3]:
        path.unlink()
    for path, item in zip(files[3:5], sample_items(2, seed=99)):
        item.image.save(path, quality=90)  # same name, new content
    added = sample_items(4, seed=123)
    for item in added:
        item.image.save(folder / f"new-{item.id}.jpg", quality=90)
    assert "61 items: 6 embedded, 55 unchanged" in cli("embed", str(folder), "--out", str(out), "--workers", "0").output
    result = cli("index", str(out), *store_args(alias))
    assert "6 written, 55 unchanged, 3 deleted; store now holds 61 documents" in result.output

    store = make_store(index=alias)
    try:
        stored = store.content_hashes()
        assert len(stored) == 61 and not {p.name for p in files[:3]} & stored.keys()
        assert store.fetch([p.name for p in files[:3]]) == []
        with Image.open(files[3]) as changed_image:
            changed = encoder.encode_images([changed_image.convert("RGB")])[0]
        assert float(np.dot(store.fetch([files[3].name])[0].vector, changed)) > 0.999
        new_vector = encoder.encode_images([added[0].image])[0]
        hits = search(store, vector=new_vector, text=None, options=SearchOptions(mode="vector", k=1)).hits
        assert hits[0].id == f"new-{added[0].id}.jpg"
    finally:
        store.close()


def _app(encoder: Encoder, alias: str, cache_dir: Path, **overrides):
    user_password = _auth() or ("", "")
    settings = Settings(store="opensearch", opensearch_url=URL, opensearch_index=alias, cache_dir=cache_dir,
                        opensearch_user=user_password[0], opensearch_password=user_password[1], **overrides)
    return create_app(settings, encoder=encoder)


def _close(app) -> None:
    state = state_of(app)
    state.encoding.close()
    state.store.close()


def test_flask_app_searches_opensearch(encoder, large_store, large_corpus, tmp_path):
    app = _app(encoder, large_store.alias, tmp_path / "cache")
    try:
        client = app.test_client()
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.json
        assert ready.json["store"] == "opensearch" and ready.json["documents"] == LARGE_CORPUS_ITEMS
        body = client.post("/v1/search", json={"text": "blue square", "k": 5}).json
        assert body["store"] == "opensearch" and body["mode"] == "hybrid"
        assert [concept(h) for h in body["hits"]] == [("blue", "square")] * 5
        assert {"vector", "bm25", "fused"} <= body["hits"][0]["scores"].keys()
        body = client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 5,
                                               "filters": {"color": "green"}}).json
        assert [concept(h) for h in body["hits"]] == [("green", "circle")] * 5
        record = json.loads(large_corpus.read_text().splitlines()[0])
        image = base64.b64encode((large_corpus.parent / record["path"]).read_bytes()).decode()
        body = client.post("/v1/search", json={"image": image, "k": 3}).json
        assert body["mode"] == "vector" and body["hits"][0]["id"] == record["id"]
    finally:
        _close(app)


@pytest.mark.parametrize(("mode", "exact"), [("vector", True), ("hybrid", True), ("hybrid", False)])
def test_pages_past_the_candidates_are_slices_of_one_ranking_none_repeated_none_skipped(
        encoder, large_store, tmp_path, mode, exact):
    # Hybrid without exact is fused in the cluster (the native hybrid query), with exact in Python.
    assert uses_native_hybrid(large_store, SearchOptions(mode=mode, exact=exact)) is (mode == "hybrid" and not exact)
    app = _app(encoder, large_store.alias, tmp_path / "cache", max_k=60, rerank_candidates=10)
    try:
        client = app.test_client()
        query = {"text": "red circle", "mode": mode, "exact": exact, "candidates": 10}
        paged = [h["id"] for page in search_pages(client, query, k=5) for h in page["hits"]]
        assert len(paged) == len(set(paged)) == 60
        assert paged == [h["id"] for h in client.post("/v1/search", json={**query, "k": 60}).json["hits"]]
        assert paged[:10] == [h["id"] for h in client.post("/v1/search", json={**query, "k": 10}).json["hits"]]
    finally:
        _close(app)


@pytest.mark.parametrize(("mode", "exact"), [("vector", False), ("bm25", False), ("hybrid", True), ("hybrid", False)])
def test_the_page_ending_at_the_candidates_asks_the_store_one_rank_past_them_not_max_k(
        encoder, large_store, tmp_path, mode, exact):
    # Before, it asked for max_k (1000) ranks, the depth of the pages past the candidates, only to learn
    # whether one more hit exists.
    app = _app(encoder, large_store.alias, tmp_path / "cache")
    try:
        client = app.test_client()
        query = {"text": "red circle", "mode": mode, "exact": exact, "filters": {"color": "red"}, "k": 10}
        matches = len(client.post("/v1/search", json={**query, "k": 1000}).json["hits"])
        assert 20 < matches < 1000
        # More hits than the candidates, then exactly as many.
        for candidates, next_offset in ((matches - 10, matches - 10), (matches, None)):
            with coarse_depths(state_of(app).store) as depths:
                page = client.post("/v1/search", json={**query, "offset": candidates - 10,
                                                       "candidates": candidates}).json
            assert page.get("next_offset") == next_offset and max(depths) == candidates + 1
            window = client.post("/v1/search", json={**query, "k": candidates, "candidates": candidates}).json
            assert page["hits"] == window["hits"][-10:]
    finally:
        _close(app)


def test_flask_readyz_reports_a_missing_index(encoder, alias, tmp_path):
    app = _app(encoder, alias, tmp_path / "cache")  # the alias fixture's name: nothing created yet
    try:
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 503
        assert ready.json["status"] == "not_ready" and "opensearch" in ready.json["reason"]
    finally:
        _close(app)


def test_caption_and_manifest_edits_reach_opensearch_without_re_encoding(tmp_path, alias):
    """Identity covers what is indexed: a .txt caption edited beside an image, and a manifest's text
    and metadata edited, are re-indexed (BM25 and filters see the new values) with the stored vector."""
    folder, manifest_dir = tmp_path / "photos", tmp_path / "corpus"
    folder.mkdir()
    manifest_dir.mkdir()
    rows = []
    for item in sample_items(8, seed=12):
        item.image.save(folder / f"{item.id}.jpg", quality=90)
        (folder / f"{item.id}.txt").write_text(f"plain caption {item.id}")
        item.image.save(manifest_dir / f"{item.id}.jpg", quality=90)
        rows.append({"id": f"m-{item.id}", "path": f"{item.id}.jpg", "text": "plain shape",
                     "metadata": {"brand": "acme"}})

    def write_manifest() -> Path:
        path = manifest_dir / "manifest.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    folder_out, manifest_out = tmp_path / "folder-shards", tmp_path / "manifest-shards"
    cli("embed", str(folder), "--out", str(folder_out), "--workers", "0")
    cli("embed", str(write_manifest()), "--out", str(manifest_out), "--workers", "0")
    folder_alias, manifest_alias = alias, f"{alias}-m"
    cli("index", str(folder_out), *store_args(folder_alias))
    cli("index", str(manifest_out), *store_args(manifest_alias))

    edited = sorted(folder.glob("*.txt"))[2]
    edited.write_text("a zebra at the waterhole")
    rows[1]["text"] = "a zebra shape"
    rows[5]["metadata"] = {"brand": "globex"}
    write_manifest()
    assert "1 with new text or metadata" in cli("embed", str(folder), "--out", str(folder_out), "--workers", "0").output
    assert "0 embedded" in cli("embed", str(manifest_dir / "manifest.jsonl"), "--out", str(manifest_out),
                               "--workers", "0").output
    assert "1 written, 7 unchanged" in cli("index", str(folder_out), *store_args(folder_alias)).output
    assert "2 written, 6 unchanged" in cli("index", str(manifest_out), *store_args(manifest_alias)).output

    folder_store, manifest_store = make_store(index=folder_alias), make_store(index=manifest_alias)
    try:
        assert [h.id for h in folder_store.text_search("zebra", 10)] == [edited.with_suffix(".jpg").name]
        assert edited.with_suffix(".jpg").name not in {h.id for h in folder_store.text_search("plain", 10)}
        assert [h.id for h in manifest_store.text_search("zebra", 10)] == [rows[1]["id"]]
        assert [h.id for h in manifest_store.text_search("shape", 10, filters={"brand": "globex"})] == [rows[5]["id"]]
        assert rows[5]["id"] not in {h.id for h in manifest_store.text_search("shape", 10, filters={"brand": "acme"})}
    finally:
        folder_store.close()
        manifest_store.close()
        client = _client()
        client.indices.delete(index=owned_indices(manifest_alias), ignore_unavailable=True)
        client.close()
