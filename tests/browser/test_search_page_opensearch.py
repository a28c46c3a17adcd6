"""The same page on the OpenSearch store: the test corpus indexed into a real node under an alias of this
test's own, served by gunicorn with SIDECAR_STORE=opensearch, driven in Chromium."""

from __future__ import annotations

import json
import uuid

import pytest

from sidecar.ingest.indexing import index_shards
from tests.browser.conftest import server_env
from tests.browser.pages import hits, manifest_rows, only_this_server, open_page, search_for, settle, thumbnails_loaded
from tests.integration.conftest import URL, drop, make_store, node  # noqa: F401 - node: the fixture
from tests.support import gunicorn_server

pytestmark = [pytest.mark.browser, pytest.mark.integration]


@pytest.fixture(scope="module")
def opensearch_page_server(node, shards, test_cache_dir, tmp_path_factory):  # noqa: F811 - node: the fixture
    store = make_store(index=f"it-page-{uuid.uuid4().hex[:10]}")
    try:
        index_shards(store, shards, progress=False)
        folder = tmp_path_factory.mktemp("opensearch-page-server")
        env = {**server_env(folder / "unused-store", folder / "cache", test_cache_dir), "SIDECAR_STORE": "opensearch",
               "SIDECAR_OPENSEARCH_URL": URL, "SIDECAR_OPENSEARCH_INDEX": store.alias}
        with gunicorn_server(env, folder / "server.log") as url:
            yield url
    finally:
        drop(store)


def test_a_typed_query_more_like_this_and_filters_on_opensearch(browser, opensearch_page_server, corpus):
    page = open_page(browser, opensearch_page_server)
    assert "400 documents · opensearch store" in page.inner_text("#store-info")
    colours = {row["metadata"]["color"] for row in manifest_rows(corpus)}
    options = page.eval_on_selector_all("#filters select[data-field='color'] option", "els => els.map(e => e.value)")
    assert {json.loads(value) for value in options if value} == colours  # built from the node's aggregations
    found = search_for(page, "red circle")
    assert found[0]["metadata"]["color"] == "red" and found[0]["metadata"]["shape"] == "circle"
    assert found[0]["stages"] == ["vector", "bm25", "fused"]
    thumbnails_loaded(page)  # read from the node by id
    browser.screenshot("opensearch-search")
    picked = found[3]
    settle(page, "/v1/search", lambda: page.locator("#hits > li").nth(3).get_by_role("button").click())
    assert hits(page)[0]["id"] == picked["id"]
    settle(page, "/v1/search", lambda: page.select_option("#filters select[data-field='size']", json.dumps("large")))
    assert all(hit["metadata"]["size"] == "large" for hit in hits(page))
    only_this_server(browser, opensearch_page_server)


def test_an_image_and_its_captions_on_opensearch(browser, opensearch_page_server, corpus):
    row = manifest_rows(corpus)[11]
    page = open_page(browser, opensearch_page_server)
    settle(page, "/v1/search", lambda: page.set_input_files("#image-file", str(corpus.parent / row["path"])))
    assert hits(page)[0]["id"] == row["id"]
    settle(page, "/v1/captions", lambda: page.check("input[name='find'][value='captions']"))
    captions = page.eval_on_selector_all("#captions > li .caption", "els => els.map(e => e.textContent)")
    assert row["text"] in captions[:3]
