"""The API the search page stands on, usable by any client: more like this (`like`), pagination (`offset`),
facets, thumbnails by id (and nothing else from disk), image → text (/v1/captions), the page's own files."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections import Counter
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document
from tests.support import coarse_depths, image_b64, search_pages


def manifest_rows(corpus):
    return [json.loads(line) for line in corpus.read_text().splitlines()]


# ---- more like this -------------------------------------------------------------------------------

def test_more_like_this_searches_by_the_stored_vector_and_the_document_comes_first(client, corpus):
    rows = manifest_rows(corpus)[:30]
    for row in rows:
        response = client.post("/v1/search", json={"like": row["id"], "k": 5})
        assert response.status_code == 200, response.json
        first = response.json["hits"][0]
        assert first["id"] == row["id"] and first["scores"]["vector"] == pytest.approx(1.0, abs=1e-5)
    # The same ranking as uploading the document's own image (a stored photo queried by itself).
    row = rows[0]
    by_upload = client.post("/v1/search", json={"image": image_b64(corpus.parent / row["path"]), "k": 10}).json
    by_id = client.post("/v1/search", json={"like": row["id"], "k": 10}).json
    assert [h["id"] for h in by_id["hits"]] == [h["id"] for h in by_upload["hits"]]


def test_more_like_this_with_text_searches_near_both(client, corpus):
    row = next(r for r in manifest_rows(corpus) if r["metadata"]["color"] != "red")
    response = client.post("/v1/search", json={"like": row["id"], "text": "red", "k": 10})
    assert response.status_code == 200 and response.json["mode"] == "hybrid"
    colours = Counter(hit["metadata"]["color"] for hit in response.json["hits"])
    alone = Counter(hit["metadata"]["color"] for hit in client.post("/v1/search", json={"like": row["id"], "k": 10})
                    .json["hits"])
    assert colours["red"] > alone["red"]


def test_like_of_a_document_whose_fine_vector_has_another_size_skips_the_rerank_saying_so_not_a_5xx(
        app_settings, encoder, tmp_path):
    # The documents' fine vectors (32-d) are another fine model's than the served one (the tiny model, 64-d).
    # With text, the fine query summed the text's 64-d vector with the liked one's 32-d: a ValueError, a 500.
    rng = np.random.default_rng(3)

    def unit(size: int) -> np.ndarray:
        vector = rng.normal(size=size).astype(np.float32)
        return vector / np.linalg.norm(vector)

    store_path = tmp_path / "store"
    with EmbeddedStore(store_path) as store:
        store.claim(encoder.signature)
        store.upsert([Document(id=f"doc{i}", vector=unit(encoder.dim), text=f"a red thing {i}", fine_vector=unit(32))
                      for i in range(5)])
    store = EmbeddedStore(store_path)
    app = create_app(dataclasses.replace(app_settings, store_path=store_path), encoder=encoder, store=store,
                     fine_encoder=encoder)
    try:
        for body in ({"like": "doc0", "text": "red"}, {"like": "doc0"}):
            response = app.test_client().post("/v1/search", json={**body, "k": 3})
            assert response.status_code == 200, response.json
            assert response.json["rerank"] is False and len(response.json["hits"]) == 3
            assert response.json["rerank_skipped"] == (
                "the liked document 'doc0' has a fine vector of 32 dimensions, this server's fine model gives 64: "
                "embedded with another fine model; serve that one, or embed with --fine-model set to this one and "
                "index again")
    finally:
        state_of(app).quality.close()
        state_of(app).encoding.close()
        state_of(app).fine_encoding.close()
        store.close()


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"like": "no-such-id"}, 404, "field 'like': no document with id 'no-such-id' in the store"),
    ({"like": ""}, 400, "field 'like' is empty: send a stored document's id"),
    ({"like": 7}, 400, "field 'like' must be a string, got an integer"),
    ({"like": "item-000001", "image": "iVBORw0KGgo="}, 400, "send field 'image' or field 'like', not both"),
    # Said of an image query alone before, though this query is a stored document.
    ({"like": "item-000001", "mode": "bm25"}, 400, "field 'text' is required for mode bm25; a query by field "
                                                   "'image' or 'like' alone uses mode vector"),
])
def test_a_bad_like_names_the_field(client, body, status, message):
    response = client.post("/v1/search", json=body)
    assert response.status_code == status, response.json
    assert message in response.json["error"]["message"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/search", {"like": "a" * 70_000}),
    ("GET", "/v1/documents/" + "a" * 70_000 + "/thumbnail", None),
    ("POST", "/v1/opensearch/rerank/ids", {"query": "red", "documents": ["a" * 70_000]}),
])
def test_an_unknown_id_is_echoed_by_its_first_200_characters_and_its_length_not_whole(client, method, path, body):
    # The 404 of a 70,000-character `like` id held all 70,000 characters.
    response = client.open(path, method=method, json=body)
    message = response.json["error"]["message"]
    assert response.status_code in (400, 404) and len(message) < 500, (response.status_code, len(message))
    assert f"{'a' * 200!r} (the first 200 of its 70000 characters)" in message


# ---- pagination -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["vector", "bm25", "hybrid"])
def test_pages_are_consecutive_slices_of_one_ranking(client, mode):
    whole = client.post("/v1/search", json={"text": "red circle", "mode": mode, "k": 30}).json
    pages, offset = [], 0
    while offset is not None and offset < 30:
        page = client.post("/v1/search", json={"text": "red circle", "mode": mode, "k": 10, "offset": offset}).json
        assert page["offset"] == offset
        pages += page["hits"]
        offset = page.get("next_offset")
    assert [h["id"] for h in pages] == [h["id"] for h in whole["hits"]]
    assert [h["score"] for h in pages] == [h["score"] for h in whole["hits"]]


@pytest.mark.parametrize("fusion", ["minmax", "zscore"])
def test_pages_ending_at_the_candidates_repeat_and_skip_no_hit_of_the_ranking(client, fusion):
    # Hybrid fusion normalises over the candidates: the page ending at rerank_candidates (100) ranks as many.
    query = {"text": "green circle", "mode": "hybrid", "fusion": fusion}
    whole = client.post("/v1/search", json={**query, "k": 100}).json
    first = client.post("/v1/search", json={**query, "k": 50}).json
    second = client.post("/v1/search", json={**query, "k": 50, "offset": first["next_offset"]}).json
    paged = [h["id"] for h in first["hits"] + second["hits"]]
    assert len(set(paged)) == 100
    assert paged == [h["id"] for h in whole["hits"]]


@pytest.mark.parametrize("mode", ["vector", "bm25", "hybrid"])
def test_pages_past_the_candidates_are_slices_of_one_ranking_none_repeated_none_skipped(build_app, mode):
    # Before, each page past the 10 candidates ranked offset + k of them: hybrid fusion normalised over another
    # depth each time, so pages repeated hits of earlier pages and skipped others.
    client = build_app(max_k=60, rerank_candidates=10).test_client()
    query = {"text": "red circle", "mode": mode, "exact": True, "candidates": 10}
    paged = [h["id"] for page in search_pages(client, query, k=5) for h in page["hits"]]
    whole = [h["id"] for h in client.post("/v1/search", json={**query, "k": 60}).json["hits"]]
    assert len(paged) == len(set(paged)) == 60 and paged == whole
    # The first 10 ranks are the ranking a page within the candidates shows.
    assert paged[:10] == [h["id"] for h in client.post("/v1/search", json={**query, "k": 10}).json["hits"]]
    if mode != "hybrid":  # without fusion (nor a fine model) every depth ranks alike: the one exact ranking
        assert paged == [h["id"] for h in client.post("/v1/search", json={**query, "k": 60, "candidates": 60})
                         .json["hits"]]


def test_a_page_ending_at_the_candidates_has_a_next_offset_exactly_while_more_hits_exist(client):
    matches = len(client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 1000}).json["hits"])
    query = {"text": "circle", "mode": "bm25", "k": 10}
    more = client.post("/v1/search", json={**query, "offset": matches - 20, "candidates": matches - 10}).json
    assert len(more["hits"]) == 10 and more["next_offset"] == matches - 10
    last = client.post("/v1/search", json={**query, "offset": matches - 10, "candidates": matches}).json
    assert len(last["hits"]) == 10 and "next_offset" not in last


@pytest.mark.parametrize("mode", ["vector", "bm25", "hybrid"])
def test_the_page_ending_at_the_candidates_asks_the_store_one_rank_past_them_not_max_k(app, mode):
    # Before, it asked for max_k (1000) ranks, the depth of the pages past the candidates, only to learn
    # whether one more hit exists.
    client = app.test_client()
    query = {"text": "red circle", "mode": mode, "filters": {"color": "red"}, "k": 10}
    matches = len(client.post("/v1/search", json={**query, "k": 1000}).json["hits"])
    assert 20 < matches < 100
    # More hits than the candidates, then exactly as many.
    for candidates, next_offset in ((matches - 10, matches - 10), (matches, None)):
        with coarse_depths(state_of(app).store) as depths:
            page = client.post("/v1/search", json={**query, "offset": candidates - 10, "candidates": candidates}).json
        assert page.get("next_offset") == next_offset and max(depths) == candidates + 1
        # Its hits are still the last 10 of the candidates' ranking.
        window = client.post("/v1/search", json={**query, "k": candidates, "candidates": candidates}).json["hits"]
        assert page["hits"] == window[-10:]


def test_next_offset_is_present_exactly_while_more_hits_exist(client):
    matches = len(client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 1000}).json["hits"])
    assert 20 < matches < 990
    last = (matches - 1) // 10 * 10
    assert client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 10, "offset": last - 10}) \
        .json["next_offset"] == last
    final = client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 10, "offset": last}).json
    assert "next_offset" not in final and len(final["hits"]) == matches - last
    beyond = client.post("/v1/search", json={"text": "circle", "mode": "bm25", "k": 10, "offset": matches}).json
    assert beyond["hits"] == [] and "next_offset" not in beyond


def test_paging_by_next_offset_reaches_every_hit_up_to_max_k_at_a_k_that_does_not_divide_it(build_app):
    # Before, next_offset was offered only while a whole next page fitted under max_k: at k 3 of max_k 20
    # paging stopped after 18 hits, and a page asking past max_k was a 400.
    client = build_app(max_k=20, rerank_candidates=10).test_client()
    query = {"text": "red circle", "mode": "hybrid", "exact": True}
    pages = search_pages(client, query, k=3)
    whole = client.post("/v1/search", json={**query, "k": 20}).json
    assert [h["id"] for page in pages for h in page["hits"]] == [h["id"] for h in whole["hits"]]
    assert len(whole["hits"]) == 20 and [page["offset"] for page in pages] == [0, 3, 6, 9, 12, 15, 18]
    last = pages[-1]
    assert len(last["hits"]) == 2 and "next_offset" not in last and last["cut_at_max_k"] is True
    assert all("cut_at_max_k" not in page for page in pages[:-1])


def test_a_page_asking_past_max_k_ends_at_max_k_saying_so_only_where_the_ranking_reaches_it(build_app):
    client = build_app(max_k=20, rerank_candidates=10).test_client()
    query = {"text": "circle", "mode": "bm25"}
    whole = client.post("/v1/search", json={**query, "k": 20}).json["hits"]
    page = client.post("/v1/search", json={**query, "k": 10, "offset": 15}).json
    assert page["hits"] == whole[15:] and page["cut_at_max_k"] is True and "next_offset" not in page
    # A ranking that ends before max_k: the page is short because the ranking ends, not because of max_k.
    few = {"text": "circle", "mode": "bm25", "filters": {"color": "blue"}}
    ranked = client.post("/v1/search", json={**few, "k": 20}).json["hits"]
    assert 3 < len(ranked) < 18
    short = client.post("/v1/search", json={**few, "k": 5, "offset": 17}).json
    assert short["hits"] == [] and "cut_at_max_k" not in short and "next_offset" not in short


@pytest.mark.parametrize(("body", "message"), [
    ({"text": "red", "offset": 1000, "k": 10}, "field 'offset' must be between 0 and 999 (max_k - 1), got 1000"),
    ({"text": "red", "offset": -1}, "field 'offset' must be between 0 and 999 (max_k - 1), got -1"),
    ({"text": "red", "offset": "2"}, "field 'offset' must be an integer, got a string"),
])
def test_an_offset_past_the_limit_is_refused_naming_it(client, body, message):
    response = client.post("/v1/search", json=body)
    assert response.status_code == 400 and message in response.json["error"]["message"]


# ---- facets ---------------------------------------------------------------------------------------

def test_facets_count_every_stored_documents_metadata(client, corpus):
    rows = manifest_rows(corpus)
    response = client.get("/v1/facets?size=100")
    assert response.status_code == 200, response.json
    assert response.json["documents"] == len(rows)
    facets = response.json["facets"]
    assert sorted(facets) == ["color", "position", "shape", "size"]
    for name, facet in facets.items():
        assert {v["value"]: v["count"] for v in facet["values"]} == Counter(r["metadata"][name] for r in rows)
        assert facet["other"] == 0
    top = client.get("/v1/facets?size=2").json["facets"]["color"]
    assert len(top["values"]) == 2 and top["other"] == len(rows) - sum(v["count"] for v in top["values"])


@pytest.mark.parametrize(("query", "message"), [
    ("size=0", "query parameter 'size' must be an integer between 1 and 1000, got '0'"),
    ("size=²", "query parameter 'size' must be an integer between 1 and 1000, got '²'"),
    ("fields=color", "unknown query parameter 'fields'; it takes size"),
    ("size=1&size=2", "query parameter 'size' is given 2 times: send it once"),
])
def test_bad_facet_parameters_are_refused_naming_them(client, query, message):
    response = client.get(f"/v1/facets?{query}")
    assert response.status_code == 400 and message in response.json["error"]["message"]


# ---- thumbnails -----------------------------------------------------------------------------------

def test_each_documents_thumbnail_is_its_own_image_served_by_id(client, corpus):
    for row in manifest_rows(corpus)[:10]:
        response = client.get(f"/v1/documents/{row['id']}/thumbnail")
        assert response.status_code == 200 and response.mimetype == "image/jpeg"
        with Image.open(io.BytesIO(response.data)) as thumbnail, Image.open(corpus.parent / row["path"]) as source:
            assert thumbnail.size == source.size  # 64-px renders: thumbnails are never enlarged
            difference = np.abs(np.asarray(thumbnail.convert("RGB"), dtype=float) - np.asarray(source.convert("RGB")))
            assert difference.mean() < 6
        again = client.get(f"/v1/documents/{row['id']}/thumbnail", headers={"If-None-Match": response.headers["ETag"]})
        assert again.status_code == 304 and again.data == b""


@pytest.mark.parametrize("path", [
    "/v1/documents/no-such-id/thumbnail", "/v1/documents/../../../../etc/passwd/thumbnail",
    "/v1/documents/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumbnail", "/v1/documents/item-000001/../../openapi.yaml",
    "/static/../openapi.yaml", "/static/%2e%2e%2fopenapi.yaml", "/static/page.py", "/static/index.html",
    "/static/", "/v1/documents/item-000001/vector",
    # Paths of more than one segment: only Flask's own static route (were it registered) would take them.
    "/static/./index.html", "/static/a/../page.css",
])
def test_nothing_on_disk_but_thumbnails_and_the_page_is_reachable(client, path):
    response = client.get(path)
    assert response.status_code == 404 and response.mimetype == "application/json", (path, response.data[:200])


def test_an_id_with_slashes_and_spaces_is_served_when_percent_encoded(build_app, tmp_path, encoder):
    # A folder corpus's ids are relative paths: "shoes/red sneaker.jpg".
    store_path = tmp_path / "store"
    with EmbeddedStore(store_path) as store:
        store.claim(encoder.signature)
        vector = np.zeros(encoder.dim, dtype=np.float32)
        vector[0] = 1
        store.upsert([Document(id="shoes/red sneaker.jpg", vector=vector, thumbnail=b"\xff\xd8jpeg"),
                      Document(id="shoes/plain.jpg", vector=vector)])
    client = build_app(store_path=store_path).test_client()
    assert client.get("/v1/documents/shoes%2Fred%20sneaker.jpg/thumbnail").data == b"\xff\xd8jpeg"
    assert client.get("/v1/documents/shoes/red sneaker.jpg/thumbnail").data == b"\xff\xd8jpeg"
    missing = client.get("/v1/documents/shoes%2Fplain.jpg/thumbnail")
    assert missing.status_code == 404
    assert "indexed from shards without thumbnails" in missing.json["error"]["message"]


def test_an_id_with_leading_trailing_or_doubled_slashes_gets_its_own_thumbnail_not_a_redirect(build_app, tmp_path,
                                                                                                encoder):
    # Ids are whatever the corpus holds: with slashes merged, "/shoes/red.jpg" was redirected (308) to the
    # thumbnail of "shoes/red.jpg", another document.
    ids = ["shoes/red.jpg", "/shoes/red.jpg", "//shoes/red.jpg", "shoes//red.jpg", "shoes/red.jpg/", "/", "//"]
    store_path = tmp_path / "store"
    with EmbeddedStore(store_path) as store:
        store.claim(encoder.signature)
        vector = np.zeros(encoder.dim, dtype=np.float32)
        vector[0] = 1
        store.upsert([Document(id=doc_id, vector=vector, thumbnail=b"\xff\xd8" + doc_id.encode()) for doc_id in ids])
    client = build_app(store_path=store_path).test_client()
    for doc_id in ids:
        # Percent-encoded as the page sends it (%2F reaches the route as "/"), and as is.
        for sent in (quote(doc_id, safe=""), doc_id):
            response = client.get(f"/v1/documents/{sent}/thumbnail")
            assert (response.status_code, response.data) == (200, b"\xff\xd8" + doc_id.encode()), (sent, response.headers)
    missing = client.get("/v1/documents/%2Fno-such-id/thumbnail")
    assert missing.status_code == 404 and "'/no-such-id'" in missing.json["error"]["message"]


# ---- image → text -------------------------------------------------------------------------------------

def test_an_images_own_caption_ranks_at_the_top(client, corpus):
    rows = manifest_rows(corpus)[:40]
    first = 0
    for row in rows:
        response = client.post("/v1/captions", json={"image": image_b64(corpus.parent / row["path"]), "k": 3})
        assert response.status_code == 200, response.json
        captions = response.json["captions"]
        texts = [c["text"] for c in captions]
        assert row["text"] in texts, (row, captions)
        assert row["id"] in captions[texts.index(row["text"])]["ids"]
        assert [c["score"] for c in captions] == sorted((c["score"] for c in captions), reverse=True)
        first += texts[0] == row["text"]
    # The README's "Image → text" states these bounds.
    assert first >= 0.8 * len(rows)


def test_captions_of_a_stored_document_match_those_of_its_uploaded_image(client, corpus):
    row = manifest_rows(corpus)[3]
    by_id = client.post("/v1/captions", json={"like": row["id"], "k": 5}).json["captions"]
    by_upload = client.post("/v1/captions", json={"image": image_b64(corpus.parent / row["path"]), "k": 5}).json
    assert [c["text"] for c in by_id] == [c["text"] for c in by_upload["captions"]]
    assert set(by_upload["took_ms"]) == {"encode", "coarse", "captions"}


def test_captions_respect_filters(client, corpus):
    row = next(r for r in manifest_rows(corpus) if r["metadata"]["color"] == "red")
    response = client.post("/v1/captions", json={"like": row["id"], "k": 10, "filters": {"color": "blue"}})
    assert response.status_code == 200
    assert response.json["captions"] and all("blue" in c["text"] for c in response.json["captions"])


@pytest.mark.parametrize(("body", "status", "message"), [
    ({}, 400, "send field 'image' (base64) or field 'like' (a stored document's id): one of the two"),
    ({"like": "item-000001", "image": "iVBORw0KGgo="}, 400, "one of the two"),
    ({"text": "red"}, 400, "unknown field 'text' in the request body"),
    ({"like": "gone"}, 404, "field 'like': no document with id 'gone' in the store"),
    ({"like": ""}, 400, "field 'like' is empty: send a stored document's id"),
    ({"image": "bm90IGFuIGltYWdl"}, 415, "field 'image': not a recognised image format"),
    ({"like": "item-000001", "k": 0}, 400, "field 'k' must be between 1 and 1000 (max_k), got 0"),
    ({"like": "item-000001", "ef_search": None}, 400, "field 'ef_search' must be an integer, got null"),
])
def test_bad_caption_requests_name_the_field(client, body, status, message):
    response = client.post("/v1/captions", json=body)
    assert response.status_code == status, response.json
    assert message in response.json["error"]["message"]


# ---- the page's own files ---------------------------------------------------------------------------------

def test_the_page_and_its_files_are_served_with_a_policy_that_keeps_the_browser_here(client):
    total = 0
    for path, mimetype in (("/", "text/html"), ("/static/page.js", "text/javascript"),
                           ("/static/page.css", "text/css")):
        response = client.get(path)
        assert response.status_code == 200 and response.mimetype == mimetype
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        total += len(response.data)
    assert total < 100_000
    html = client.get("/").get_data(as_text=True)
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere


def test_the_page_names_its_icon_so_browsers_do_not_ask_for_a_missing_favicon_ico(client):
    html = client.get("/").get_data(as_text=True)
    icon = re.search(r'<link rel="icon" href="([^"]+)"', html)
    assert icon is not None, "without an icon link every page load asks for /favicon.ico: a 404 in the server's log"
    response = client.get(icon.group(1))
    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]  # an SVG runs no script here
