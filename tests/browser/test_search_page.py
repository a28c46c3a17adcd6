"""The search page in a real Chromium against the real server (gunicorn, the tiny model, the test corpus):
what a person does with it — type, upload, drop or paste an image, change the mode, "more like this",
filter, page, ask for captions — and what they see when something fails; by keyboard alone too."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from PIL import Image, PngImagePlugin

import sidecar.api
from sidecar.api.app import create_app
from sidecar.api.auth import key_entry, new_key
from sidecar.api.page import ASSETS
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.model.tiny_model import LARGE_MODEL_NAME
from sidecar.stores.embedded import EmbeddedStore
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.types import Document
from tests.browser.conftest import server_env, serving
from tests.browser.pages import (
    hits,
    manifest_rows,
    only_this_server,
    open_page,
    open_page_on_a_paused_clock,
    search_for,
    settle,
    thumbnails_loaded,
)
from tests.support import free_port, gunicorn_server

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[2]
README_SCREENSHOT = REPO / "docs" / "img" / "search-page.png"


# For page.wait_for_function: `n` thumbnails of the results shown have loaded.
THUMBNAILS_LOADED = ("n => [...document.querySelectorAll('#hits img.thumb')]"
                     ".filter(img => img.complete && img.naturalWidth > 0).length === n")


def page_fingerprint() -> str:
    """What the README screenshot records it was taken of: the page's own files."""
    folder = Path(sidecar.api.__file__).parent / "static"
    return hashlib.sha256(b"".join((folder / name).read_bytes() for name in sorted(ASSETS))).hexdigest()


def test_a_typed_query_shows_thumbnails_and_the_top_result_is_that_concept(browser, page_server):
    page = open_page(browser, page_server)
    found = search_for(page, "red circle")
    assert len(found) == 20
    assert found[0]["metadata"]["color"] == "red" and found[0]["metadata"]["shape"] == "circle"
    thumbnails_loaded(page)
    for stage in ("encode", "coarse", "fetch", "round trip"):  # the latency breakdown
        assert page.locator(f"#latency dd[data-stage='{stage}']").inner_text().endswith(" ms")
    assert page.locator("#latency dd[data-stage='rerank']").count() == 0  # skipped: no rerank latency
    assert "Results 1–20 (mode hybrid, fusion minmax, no rerank)." in page.inner_text("#status")
    assert page.inner_text("#rerank-note").startswith("Rerank skipped: no fine model is configured")
    assert page.locator("#error").is_hidden()
    alt = page.get_attribute("#hits > li:first-child img", "alt")
    assert alt == found[0]["caption"]  # alt text: the document's caption
    screenshot = browser.screenshot("search-page")
    if os.environ.get("CLIP_SIDECAR_README_SCREENSHOT"):
        # Regenerate the README's picture: the fingerprint lets test_the_readme_screenshot_is_of_the_current_page
        # tell when the page changed after it was taken.
        info = PngImagePlugin.PngInfo()
        info.add_text("page-sha256", page_fingerprint())
        with Image.open(screenshot) as image:
            image.save(README_SCREENSHOT, pnginfo=info, optimize=True)
    only_this_server(browser, page_server)


def test_the_readme_screenshot_is_of_the_current_page():
    with Image.open(README_SCREENSHOT) as image:
        taken_of = image.text.get("page-sha256")
    assert taken_of == page_fingerprint(), (
        "the page changed since docs/img/search-page.png was taken: CLIP_SIDECAR_README_SCREENSHOT=1 "
        ".venv/bin/python -m pytest tests/browser -k typed_query")


@pytest.mark.parametrize("way", ["file-picker", "drop", "paste"])
def test_an_image_finds_its_own_item_first(browser, page_server, corpus, way):
    row = manifest_rows(corpus)[7]
    path = corpus.parent / row["path"]
    page = open_page(browser, page_server)
    if way == "file-picker":
        settle(page, "/v1/search", lambda: page.set_input_files("#image-file", str(path)))
    else:
        script = """([data, name, way]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
            if (way === 'drop') {
                document.getElementById('drop-zone').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
            } else {
                document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true}));
            }
        }"""
        data = base64.b64encode(path.read_bytes()).decode()
        settle(page, "/v1/search", lambda: page.evaluate(script, [data, path.name, way]))
    found = hits(page)
    assert found[0]["id"] == row["id"] and found[0]["stages"] == ["vector"]
    assert page.locator("#image-preview").is_visible()
    assert page.get_attribute("#image-preview-img", "alt") == f"Query image: {path.name}"
    thumbnails_loaded(page)
    browser.screenshot(f"image-{way}")


def test_changing_the_mode_changes_the_scores_shown(browser, page_server):
    page = open_page(browser, page_server)
    stages = {"hybrid": ["vector", "bm25", "fused"], "bm25": ["bm25"], "vector": ["vector"]}
    assert {tuple(hit["stages"]) for hit in search_for(page, "red circle")} <= {("vector", "bm25", "fused"),
                                                                                ("vector", "fused")}
    for mode in ("bm25", "vector", "hybrid"):
        settle(page, "/v1/search", lambda: page.select_option("#mode", mode))  # a change re-runs the search
        shown = hits(page)
        assert f"mode {mode}" in page.inner_text("#status")
        assert shown[0]["stages"] == stages[mode], mode
        browser.screenshot(f"mode-{mode}")


def test_more_like_this_puts_the_clicked_item_first(browser, page_server):
    page = open_page(browser, page_server)
    found = search_for(page, "green triangle")
    picked = found[4]
    settle(page, "/v1/search", lambda: page.locator("#hits > li").nth(4).get_by_role("button").click())
    shown = hits(page)
    assert shown[0]["id"] == picked["id"] and shown[0]["stages"] == ["vector"]
    assert page.locator("#hits > li").first.get_attribute("class") == "hit liked"
    assert picked["id"] in page.inner_text("#like-banner")
    assert page.input_value("#query") == ""  # the stored document alone is the query
    assert page.evaluate("document.activeElement.id") == "results"  # focus follows the new results
    browser.screenshot("more-like-this")


def test_filters_from_the_stores_facets_narrow_the_results(browser, page_server, corpus):
    page = open_page(browser, page_server)
    colours = {row["metadata"]["color"] for row in manifest_rows(corpus)}
    options = page.eval_on_selector_all("#filters select[data-field='color'] option", "els => els.map(e => e.value)")
    assert {json.loads(value) for value in options if value} == colours
    search_for(page, "circle")
    settle(page, "/v1/search", lambda: page.select_option("#filters select[data-field='color']", json.dumps("blue")))
    shown = hits(page)
    assert shown and all(hit["metadata"]["color"] == "blue" for hit in shown)


def test_pages_move_through_the_ranking(browser, page_server):
    page = open_page(browser, page_server)
    first = search_for(page, "circle")
    assert page.inner_text("#page-info") == "1–20" and page.is_disabled("#prev-page")
    settle(page, "/v1/search", lambda: page.click("#next-page"))
    second = hits(page)
    assert page.inner_text("#page-info") == "21–40"
    assert not {h["id"] for h in first} & {h["id"] for h in second}
    assert page.get_attribute("#hits", "start") == "21"
    settle(page, "/v1/search", lambda: page.click("#prev-page"))
    assert [h["id"] for h in hits(page)] == [h["id"] for h in first]


def test_captions_that_describe_an_image(browser, page_server, corpus):
    row = manifest_rows(corpus)[2]
    page = open_page(browser, page_server)
    page.check("input[name='find'][value='captions']")
    settle(page, "/v1/captions", lambda: page.set_input_files("#image-file", str(corpus.parent / row["path"])))
    captions = page.eval_on_selector_all("#captions > li .caption", "els => els.map(e => e.textContent)")
    assert row["text"] in captions[:3]
    assert page.locator("#hits").is_hidden()
    page.wait_for_function("() => [...document.querySelectorAll('#captions img.thumb')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    browser.screenshot("captions")


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(("name", "data", "shown"), [
    ("notes.jpg", b"this is not an image at all", "Not an image the server can read: field 'image': not a recognised "
                                                   "image format"),
    ("huge.png", png((6400, 6400)), "Too large: field 'image': image is 6400x6400 = 40960000 pixels, over the limit "
                                    "of 40000000 (max_image_pixels)"),
], ids=["not-an-image", "over-the-pixel-limit"])
def test_a_bad_file_shows_the_error_not_a_blank_page(browser, page_server, name, data, shown):
    page = open_page(browser, page_server)
    search_for(page, "red circle")
    settle(page, "/v1/search", lambda: page.set_input_files(
        "#image-file", files=[{"name": name, "mimeType": "image/jpeg", "buffer": data}]))
    assert page.locator("#error").is_visible()
    assert shown in page.inner_text("#error")
    assert page.inner_text("#status") == "The search failed."
    assert page.locator("#hits > li").count() == 0 and page.is_visible("#empty")
    assert page.is_visible("#query") and page.is_enabled("#search-button")  # still usable
    browser.screenshot("bad-file")
    page.click("#clear-image")
    settle(page, "/v1/search", lambda: page.click("#search-button"))
    assert page.locator("#error").is_hidden() and hits(page)


def test_a_store_that_cannot_be_reached_is_said_so(browser, encoder, tmp_path):
    # An OpenSearch store on a loopback port nobody listens at: refused for real, no mock.
    store = OpenSearchStore(url=f"http://127.0.0.1:{free_port()}", index="nowhere")
    app = create_app(Settings(cache_dir=tmp_path / "cache", store="opensearch"), encoder=encoder, store=store)
    try:
        with serving(app) as url:
            page = browser.page
            page.goto(f"{url}/")
            page.wait_for_function("() => document.getElementById('filters-note').textContent.startsWith('Filters')")
            assert "The store cannot be reached right now" in page.inner_text("#filters-note")
            assert page.inner_text("#store-info").startswith("The server is not ready: store opensearch unavailable")
            page.fill("#query", "red circle")
            settle(page, "/v1/search", lambda: page.press("#query", "Enter"))
            error = page.inner_text("#error")
            assert error.startswith("The store cannot be reached right now:") and error.endswith("retry later. Try again in 5 s.")
            browser.screenshot("store-down")
    finally:
        state_of(app).encoding.close()
        store.close()


def test_a_server_not_ready_asks_a_page_without_its_key_for_one_and_with_it_says_why(browser, encoder, tmp_path):
    # Without a key a server that takes keys says only "not_ready", not why: the page must ask for the key, with
    # which it learns why. Not ready for real: an OpenSearch store on a loopback port nobody listens at.
    key = new_key()
    store = OpenSearchStore(url=f"http://127.0.0.1:{free_port()}", index="nowhere")
    app = create_app(Settings(cache_dir=tmp_path / "cache", store="opensearch", api_keys=key_entry("web", [], key)),
                     encoder=encoder, store=store)
    try:
        with serving(app) as url:
            page = browser.page
            page.goto(f"{url}/")
            page.wait_for_function("() => document.getElementById('store-info').textContent !== 'Connecting…'")
            asked = ("This server needs an API key: enter it under “API key” in the search options. "
                     "without one it says only that it is not ready, not why.")
            assert page.inner_text("#store-info") == asked
            assert page.inner_text("#error") == asked
            assert page.locator("#key-settings").get_attribute("open") is not None
            page.fill("#api-key", key)
            page.press("#api-key", "Tab")
            page.wait_for_function("() => document.getElementById('store-info').textContent.startsWith("
                                   "'The server is not ready: store opensearch unavailable')")
            assert page.locator("#error").is_hidden()  # what the box asked for is done
    finally:
        state_of(app).encoding.close()
        store.close()


def test_one_search_by_keyboard_alone(browser, page_server):
    page = open_page(browser, page_server)
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    # Focus follows the reading order: skip link, query, search, image, what to find.
    assert order[:4] == ["skip", "query", "search-button", "image-file"]
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "query"
    page.keyboard.type("blue square")
    settle(page, "/v1/search", lambda: page.keyboard.press("Enter"))
    found = hits(page)
    assert found[0]["metadata"]["color"] == "blue"
    for _ in range(60):  # on through the controls to the first result's button
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('more')"):
            break
    assert page.evaluate("document.activeElement.closest('li').dataset.id") == found[0]["id"]
    page.keyboard.press("Tab")
    target = page.evaluate("document.activeElement.closest('li').dataset.id")
    settle(page, "/v1/search", lambda: page.keyboard.press("Enter"))
    assert hits(page)[0]["id"] == target


def test_the_page_weighs_under_100_kb_and_asks_nothing_of_elsewhere(browser, page_server):
    sizes = {}
    page = browser.page
    page.on("response", lambda response: sizes.__setitem__(response.url, len(response.body()))
            if response.request.resource_type in ("document", "script", "stylesheet") else None)
    open_page(browser, page_server)
    search_for(page, "yellow star")
    thumbnails_loaded(page)
    assert set(sizes) == {f"{page_server}/", f"{page_server}/static/page.js", f"{page_server}/static/page.css"}
    assert sum(sizes.values()) < 100_000, sizes
    only_this_server(browser, page_server)
    assert any(u.startswith(f"{page_server}/v1/documents/") for u in browser.requests)


def test_an_api_key_typed_on_the_page_is_kept_for_this_tab_only(browser, page_server):
    page = open_page(browser, page_server)
    page.click("#key-settings summary")
    page.fill("#api-key", "csk_example")
    page.press("#api-key", "Tab")
    sent = []
    page.on("request", lambda request: sent.append(request.headers.get("authorization"))
            if request.url.startswith(page_server) else None)
    search_for(page, "red")
    thumbnails_loaded(page)  # fetched with the key (an <img> cannot send one)
    assert sent and set(sent) == {"Bearer csk_example"}
    assert page.evaluate("sessionStorage.getItem('clip-sidecar-api-key')") == "csk_example"
    assert page.evaluate("localStorage.length") == 0



def test_with_api_keys_the_page_asks_for_one_then_searches_with_it(browser, store_path, test_cache_dir, tmp_path):
    web, embed_only = new_key(), new_key()
    entries = f"{key_entry('web', ['search'], web)},{key_entry('opensearch', ['embeddings'], embed_only)}"
    env = {**server_env(store_path, tmp_path / "cache", test_cache_dir), "SIDECAR_API_KEYS": entries}
    with gunicorn_server(env, tmp_path / "server.log", api_key=web) as url:
        page = browser.page
        page.goto(f"{url}/")  # the page's own files need no key
        page.wait_for_selector("#error:not([hidden])")
        error = page.inner_text("#error")
        assert error.startswith("This server needs an API key: enter it under “API key” in the search options.")
        # /readyz answered ready without the details, which only a key gets
        assert error.endswith("without one it answers only whether it is ready.")
        assert page.locator("#key-settings").get_attribute("open") is not None
        page.fill("#query", "red circle")
        settle(page, "/v1/search", lambda: page.press("#query", "Enter"))
        assert page.inner_text("#error").startswith("This server needs an API key") and not hits(page)
        browser.screenshot("key-missing")
        # A key outside the search scope: refused by name and scope.
        page.fill("#api-key", embed_only)
        settle(page, "/v1/search", lambda: page.press("#api-key", "Tab"))
        assert page.inner_text("#error") == ("This API key may not do that: key 'opensearch' has scope embeddings; "
                                             "/v1/search needs scope search.")
        # The right key: the refused search runs again, thumbnails come through fetch with the key.
        page.fill("#api-key", web)
        settle(page, "/v1/search", lambda: page.press("#api-key", "Tab"))
        found = hits(page)
        assert page.locator("#error").is_hidden() and found[0]["metadata"]["color"] == "red"
        thumbnails_loaded(page)
        page.wait_for_selector("#filters select")  # the facets, with the key
        assert page.inner_text("#store-info").endswith("model tiny-clip")
    only_this_server(browser, url)


@contextlib.contextmanager
def page_app(settings: Settings, encoder, store_path: Path, *, fine_encoder=None) -> Iterator[str]:
    """The app on `store_path` served in this process (werkzeug's server) until the block ends; yields its URL."""
    store = EmbeddedStore(store_path)
    app = create_app(settings, encoder=encoder, store=store, fine_encoder=fine_encoder)
    try:
        with serving(app) as url:
            yield url
    finally:
        state = state_of(app)
        state.encoding.close()
        if state.fine_encoding is not None:
            state.fine_encoding.close()
        state.quality.close()
        store.close()


@pytest.mark.slow  # the stronger tiny model (fine_encoder) trains once per test run
def test_a_page_reaching_past_the_candidates_says_which_of_its_hits_the_fine_model_reranked(
        browser, encoder, fine_encoder, fine_store_path, tmp_path):
    # The fine stage ranks the ranking's first `candidates` (15 here); the hits past them follow in coarse order.
    settings = Settings(cache_dir=tmp_path / "cache", store_path=fine_store_path)
    with page_app(settings, encoder, fine_store_path, fine_encoder=fine_encoder) as url:
        page = open_page(browser, url)
        page.select_option("#page-size", "10")
        page.fill("#candidates", "15")
        first = search_for(page, "red circle")
        assert all("rerank" in hit["stages"] for hit in first)
        model = f"{LARGE_MODEL_NAME} (weights"  # the answer's fine_model: name, weights and size
        assert f"(mode hybrid, fusion minmax, reranked by {model}" in page.inner_text("#status")
        settle(page, "/v1/search", lambda: page.click("#next-page"))
        second = hits(page)
        assert ["rerank" in hit["stages"] for hit in second] == [True] * 5 + [False] * 5
        status = page.inner_text("#status")
        assert f"first 5 reranked by {model}" in status and status.endswith("the rest past the candidates in coarse order).")
        settle(page, "/v1/search", lambda: page.click("#next-page"))
        assert not any("rerank" in hit["stages"] for hit in hits(page))
        assert f"(mode hybrid, fusion minmax, coarse order: past the candidates {model}" in page.inner_text("#status")


def test_thumbnails_the_rate_limit_refused_appear_after_retry_after(browser, encoder, store_path, tmp_path):
    key = new_key()
    # 4 requests/s: a page of 20 thumbnails is refused in part (429), then each is fetched again in turn.
    settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path, api_keys=key_entry("web", ["search"], key),
                        api_rate_limit=4)
    with page_app(settings, encoder, store_path) as url:
        statuses = []
        browser.page.on("response", lambda response: statuses.append(response.status)
                        if response.url.endswith("/thumbnail") else None)
        page = browser.page
        page.goto(f"{url}/")
        page.fill("#api-key", key)
        page.press("#api-key", "Tab")
        page.wait_for_selector("#filters select")
        assert len(search_for(page, "red circle")) == 20
        thumbnails_loaded(page)
        assert 429 in statuses and statuses.count(200) == 20, statuses
    only_this_server(browser, url)


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(out, format="JPEG")
    return out.getvalue()


def test_ids_with_leading_or_doubled_slashes_show_their_own_thumbnails(browser, encoder, tmp_path):
    # Sizes of their own: a thumbnail served for another id would show another size, a redirect to a
    # missing id none. "/red/lead.jpg" was redirected to "red/lead.jpg" (slashes merged).
    thumbnails = {"/red/lead.jpg": jpeg(40, 30), "red//double.jpg": jpeg(30, 50), "red/lead.jpg": jpeg(20, 20),
                  "red/none.jpg": None}
    store_path = red_circles(encoder, tmp_path / "store",
                             [{"id": doc_id, "thumbnail": data} for doc_id, data in thumbnails.items()])
    with page_app(Settings(cache_dir=tmp_path / "cache", store_path=store_path), encoder, store_path) as url:
        page = browser.page
        page.goto(f"{url}/")
        page.wait_for_function("() => !document.getElementById('filters-note').textContent.startsWith('Loading')")
        assert {hit["id"] for hit in search_for(page, "red circle")} == set(thumbnails)
        page.wait_for_function("() => [...document.querySelectorAll('#hits img.thumb')]"
                               ".every(img => img.complete && img.naturalWidth > 0)")
        for doc_id, data in thumbnails.items():
            hit = page.locator(f'#hits > li[data-id="{doc_id}"]')
            if data is None:  # a real 404: shown missing
                assert hit.locator(".no-thumb").inner_text() == "no thumbnail"
            else:
                with Image.open(io.BytesIO(data)) as image:
                    shown = hit.locator("img.thumb").evaluate("img => [img.naturalWidth, img.naturalHeight]")
                    assert shown == [*image.size], doc_id
    only_this_server(browser, url)


def test_each_filter_is_labelled_by_its_own_field_name(browser, encoder, tmp_path):
    # Names that differ only in characters outside [A-Za-z0-9_-] (non-ASCII ones, a space against an
    # underscore): each select must still be named by its own label, not share an id with another.
    rows = [{"色": "赤", "形": "丸", "a b": "x", "a_b": "p"}, {"色": "青", "形": "四角", "a b": "y", "a_b": "q"}]
    store_path = red_circles(encoder, tmp_path / "store", [{"metadata": row} for row in rows])
    with page_app(Settings(cache_dir=tmp_path / "cache", store_path=store_path), encoder, store_path) as url:
        page = browser.page
        page.goto(f"{url}/")
        page.wait_for_selector("#filters select")
        labelled = page.eval_on_selector_all("#filters select", "els => els.map(e => [e.dataset.field, "
                                             "[...e.labels].map(label => label.firstChild.textContent)])")
        assert sorted(labelled) == sorted([name, [name]] for name in rows[0])
        for name in rows[0]:
            assert page.get_by_role("combobox", name=name, exact=True).get_attribute("data-field") == name


def test_a_field_with_more_values_than_listed_says_so_and_takes_a_typed_value_of_its_own_type(browser, encoder,
                                                                                                 tmp_path):
    # 21 values per field: the facets list the 20 held twice each; the one held once is "other", found by typing it
    # (a number for a field of numbers: 99 the string would match nothing).
    rows = [{"serial": f"common-{i // 2}", "n": i // 2} for i in range(40)] + [{"serial": "rare", "n": 99}]
    store_path = red_circles(encoder, tmp_path / "store", [{"metadata": row} for row in rows])
    with page_app(Settings(cache_dir=tmp_path / "cache", store_path=store_path), encoder, store_path) as url:
        page = browser.page
        page.goto(f"{url}/")
        page.wait_for_selector("#filters select")
        search_for(page, "red circle")
        for field, typed in (("serial", "rare"), ("n", "99")):
            select = f"#filters select[data-field='{field}']"
            labels = page.eval_on_selector_all(f"{select} option", "els => els.map(e => e.textContent)")
            assert len(labels) == 22 and labels[-1] == "other value… (1 document holds values not listed)", labels
            box = page.get_by_role("textbox", name=f"{field}: a value not listed")
            assert box.is_hidden()
            settle(page, "/v1/search", lambda: page.select_option(select, "other"))  # no value typed yet: any
            assert box.is_visible() and page.evaluate("document.activeElement.id") == box.get_attribute("id")
            box.fill(typed)
            settle(page, "/v1/search", lambda: box.press("Enter"))
            assert [hit["id"] for hit in hits(page)] == ["doc-40"], field
            settle(page, "/v1/search", lambda: page.select_option(select, ""))  # back to any, for the next field


def red_circles(encoder, store_path: Path, documents: list[dict]) -> Path:
    """An embedded store of documents with the vector of "a red circle" and text "red circle", ids `doc-0`,
    `doc-1`, …, and the Document fields each dict gives (an id among them)."""
    with EmbeddedStore(store_path) as store:
        store.claim(encoder.signature)
        vectors = encoder.encode_texts(["a red circle"] * len(documents))
        store.upsert([Document(**{"id": f"doc-{i}", "vector": vector, "text": "red circle", **fields})
                      for i, (fields, vector) in enumerate(zip(documents, vectors))])
    return store_path


def test_a_long_unbroken_caption_or_field_name_stays_inside_its_result(browser, encoder, tmp_path):
    # A caption of one long word (a URL, a file name) or a long metadata field name: wrapped inside the
    # result's card, never drawn over the results beside it.
    long_word = "holiday_photos_2019_" + "DSC" * 40 + ".jpg"
    store_path = red_circles(encoder, tmp_path / "store", [
        {"text": long_word, "thumbnail": jpeg(20, 20)},
        {"metadata": {"camera_serial_number_of_the_body_that_took_this_picture": "x"}, "thumbnail": jpeg(20, 20)},
        {"thumbnail": jpeg(20, 20)}])
    with page_app(Settings(cache_dir=tmp_path / "cache", store_path=store_path), encoder, store_path) as url:
        page = browser.page
        page.goto(f"{url}/")
        page.wait_for_function("() => !document.getElementById('filters-note').textContent.startsWith('Loading')")
        search_for(page, "red circle")
        widths = page.eval_on_selector_all("#hits > li", "els => els.map(e => [e.dataset.id, e.clientWidth, "
                                           "Math.max(...[...e.querySelectorAll('*')].map(c => c.scrollWidth))])")
        assert len(widths) == 3
        for doc_id, card, widest in widths:
            assert widest <= card, f"{doc_id}: content {widest} px wide in a card of {card} px"


def test_a_new_api_key_keeps_the_chosen_filters_for_the_next_page(browser, encoder, store_path, tmp_path):
    # A key typed in reloads the facets: the filters chosen stay chosen, so the next page is of the same
    # (filtered) ranking as the one on screen, not of an unfiltered one.
    first, second = new_key(), new_key()
    settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path,
                        api_keys=f"{key_entry('one', ['search'], first)},{key_entry('two', ['search'], second)}")
    with page_app(settings, encoder, store_path) as url:
        page = browser.page
        page.goto(f"{url}/")
        page.fill("#api-key", first)
        page.press("#api-key", "Tab")
        page.wait_for_selector("#filters select")
        page.select_option("#page-size", "10")
        search_for(page, "circle")
        blue = json.dumps("blue")
        settle(page, "/v1/search", lambda: page.select_option("#filters select[data-field='color']", blue))
        assert {hit["metadata"]["color"] for hit in hits(page)} == {"blue"} and page.is_enabled("#next-page")
        before = page.query_selector("#filters select[data-field='color']")
        page.fill("#api-key", second)
        page.press("#api-key", "Tab")
        page.wait_for_function("select => !select.isConnected", arg=before)  # the facets' controls were rebuilt
        assert page.input_value("#filters select[data-field='color']") == blue
        settle(page, "/v1/search", lambda: page.click("#next-page"))
        shown = hits(page)
        assert shown and {hit["metadata"]["color"] for hit in shown} == {"blue"}


def test_a_newer_api_key_cancels_the_facets_still_loading_with_the_key_before(browser, page_server):
    # Each key typed loads the facets again: the load with the key before, still waiting, is given up, so its
    # answer cannot land after the newer key's and replace the filters built from it.
    page = open_page(browser, page_server)
    held = []
    # The first key's facets are held unanswered; the second key's go through.
    page.route("**/v1/facets", lambda route: route.continue_() if held else held.append(route))
    page.click("#key-settings summary")
    page.fill("#api-key", "csk_first")
    with page.expect_request("**/v1/facets"):
        page.press("#api-key", "Tab")
    before = page.query_selector("#filters select[data-field='color']")
    page.fill("#api-key", "csk_second")
    with page.expect_event("requestfailed", lambda request: request.url.endswith("/v1/facets")) as failed:
        page.press("#api-key", "Tab")
    assert (failed.value.headers["authorization"], failed.value.failure) == ("Bearer csk_first", "net::ERR_ABORTED")
    page.wait_for_function("select => !select.isConnected", arg=before)  # the second key's facets are shown
    assert page.inner_text("#filters-note") == ""


def test_a_newer_api_key_cancels_the_readiness_call_still_waiting_with_the_key_before(browser, page_server):
    # The header, the error shown and the wait the page gives a call come from /readyz, asked again with each key:
    # an answer for the key before, landing late, would replace the newer key's.
    page = open_page(browser, page_server)
    held = []
    page.route("**/readyz", lambda route: route.continue_() if held else held.append(route))
    page.click("#key-settings summary")
    page.fill("#api-key", "csk_first")
    with page.expect_request("**/readyz"):
        page.press("#api-key", "Tab")
    page.fill("#api-key", "csk_second")
    with page.expect_event("requestfailed", lambda request: request.url.endswith("/readyz")) as failed:
        page.press("#api-key", "Tab")
    assert (failed.value.headers["authorization"], failed.value.failure) == ("Bearer csk_first", "net::ERR_ABORTED")


@contextlib.contextmanager
def blue_circles_shared_before_the_api_key(browser, encoder, store_path: Path, tmp_path: Path) -> Iterator[tuple]:
    """A keyed server, and a page opened on a shared URL (text "circle", filter color=blue) without the key:
    yields the page, its search refused, and the key."""
    key = new_key()
    settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path, api_keys=key_entry("web", ["search"], key))
    with page_app(settings, encoder, store_path) as url:
        page = browser.page
        page.goto(f"{url}/#{urlencode({'text': 'circle', 'filters': json.dumps({'color': 'blue'})})}")
        page.wait_for_function("() => document.getElementById('status').textContent === 'The search failed.'")
        yield page, key


def test_a_shared_url_with_filters_opened_before_the_api_key_is_typed_searches_with_its_filters_once_it_is(
        browser, encoder, store_path, tmp_path):
    # Without a key the server refuses the facets, so the page has no filter controls to set from the URL: the
    # filters wait for the facets the key brings, and the refused search runs again with them.
    with blue_circles_shared_before_the_api_key(browser, encoder, store_path, tmp_path) as (page, key):
        assert page.inner_text("#error").startswith("This server needs an API key")
        page.fill("#api-key", key)
        settle(page, "/v1/search", lambda: page.press("#api-key", "Tab"))
        assert page.input_value("#filters select[data-field='color']") == json.dumps("blue")
        shown = hits(page)
        assert shown and {hit["metadata"]["color"] for hit in shown} == {"blue"}
        assert json.loads(parse_qs(urlsplit(page.url).fragment)["filters"][0]) == {"color": "blue"}


def test_a_key_cleared_after_the_search_it_let_through_runs_no_search_and_keeps_the_results(
        browser, encoder, store_path, tmp_path):
    # The refused search was remembered after the key let it through: each later key change ran a search again, so
    # clearing the key swapped the results shown for a refusal.
    with blue_circles_shared_before_the_api_key(browser, encoder, store_path, tmp_path) as (page, key):
        page.fill("#api-key", key)
        settle(page, "/v1/search", lambda: page.press("#api-key", "Tab"))
        shown = hits(page)
        searches = []
        page.on("request", lambda request: searches.append(request.url) if "/v1/search" in request.url else None)
        page.fill("#api-key", "")
        page.press("#api-key", "Tab")
        page.wait_for_function("() => document.getElementById('filters-note').textContent.startsWith('Filters "
                               "unavailable')")
        page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 0))")  # what follows the facets' load ran
        assert searches == [] and shown and hits(page) == shown


def test_a_shared_url_whose_query_is_changed_before_the_api_key_is_typed_does_not_put_its_filters_on_the_new_one(
        browser, encoder, store_path, tmp_path):
    # The URL's filters wait for the facets the key brings for the URL's own search only: a query typed and searched
    # instead (refused too) runs with the key unfiltered, as it was asked for.
    with blue_circles_shared_before_the_api_key(browser, encoder, store_path, tmp_path) as (page, key):
        page.fill("#query", "red square")
        settle(page, "/v1/search", lambda: page.press("#query", "Enter"))
        assert page.inner_text("#error").startswith("This server needs an API key")
        page.fill("#api-key", key)
        settle(page, "/v1/search", lambda: page.press("#api-key", "Tab"))
        assert page.input_value("#filters select[data-field='color']") == ""
        shown = hits(page)
        assert shown[0]["metadata"]["color"] == "red" and shown[0]["metadata"]["shape"] == "square"
        assert parse_qs(urlsplit(page.url).fragment)["text"] == ["red square"]
        assert "filters" not in parse_qs(urlsplit(page.url).fragment)


def test_the_search_button_keeps_keyboard_focus_through_its_search(browser, page_server):
    # A button disabled while it has focus loses it to <body>: a keyboard user who pressed Search had to start
    # tabbing from the top of the page again, and Enter in the query box did nothing while a search ran.
    page = open_page(browser, page_server)
    page.fill("#query", "blue square")
    page.focus("#search-button")
    settle(page, "/v1/search", lambda: page.keyboard.press("Enter"))
    assert hits(page)
    assert page.evaluate("document.activeElement.id") == "search-button"


def test_the_next_page_is_of_the_results_shown_not_of_text_typed_since(browser, page_server):
    page = open_page(browser, page_server)
    search_for(page, "red circle")
    settle(page, "/v1/search", lambda: page.click("#next-page"))
    second = [hit["id"] for hit in hits(page)]
    settle(page, "/v1/search", lambda: page.click("#prev-page"))
    page.fill("#query", "blue square")  # typed, not searched: the results shown are still of "red circle"
    settle(page, "/v1/search", lambda: page.click("#next-page"))
    assert [hit["id"] for hit in hits(page)] == second
    settle(page, "/v1/search", lambda: page.press("#query", "Enter"))  # a search of its own starts from page 1
    assert page.inner_text("#page-info") == "1–20" and hits(page)[0]["metadata"]["color"] == "blue"


def test_back_and_forward_step_through_searches_and_pages_not_option_changes_and_the_url_shows_the_search_shown(
        browser, page_server):
    page = open_page(browser, page_server)
    color = "#filters select[data-field='color']"

    def shown() -> tuple:
        return ([hit["id"] for hit in hits(page)], page.input_value("#query"), page.input_value("#mode"),
                page.input_value(color), page.inner_text("#page-info"))

    history = page.evaluate("history.length")
    search_for(page, "red circle")
    # Options tweaked: the search shown is ranked again in its own entry, whose URL says how.
    settle(page, "/v1/search", lambda: page.select_option(color, json.dumps("red")))
    settle(page, "/v1/search", lambda: page.select_option("#mode", "vector"))
    tuned = shown()
    assert tuned[1:] == ("red circle", "vector", json.dumps("red"), "1–20")
    assert page.evaluate("history.length") == history + 1
    tuned_url = page.url
    settle(page, "/v1/search", lambda: page.click("#next-page"))
    paged = shown()
    assert paged[1:] == ("red circle", "vector", json.dumps("red"), "21–40")
    search_for(page, "blue square")
    searched = shown()
    shared = page.url
    assert page.evaluate("history.length") == history + 3
    settle(page, "/v1/search", page.go_back)
    assert shown() == paged
    settle(page, "/v1/search", page.go_back)
    assert shown() == tuned and page.url == tuned_url
    page.go_back()  # the page as opened: no search to show
    page.wait_for_function("() => document.getElementById('hits').children.length === 0")
    assert page.input_value("#query") == "" and page.inner_text("#empty") == "Type a query or choose an image to search."
    settle(page, "/v1/search", page.go_forward)
    assert shown() == tuned

    other = page.context.new_page()  # the URL of a search, opened elsewhere, shows that search
    other.on("pageerror", lambda error: browser.errors.append(str(error)))
    settle(other, "/v1/search", lambda: other.goto(shared))
    page = other
    assert shown() == searched


def test_back_from_an_image_search_shows_the_search_before_it_and_forward_the_image_search_again(
        browser, page_server, corpus):
    # An image is too big for a URL: its entry's URL names no search (sharing it shares none, not the one before),
    # and the entry keeps the image for back and forward.
    row = manifest_rows(corpus)[7]
    path = corpus.parent / row["path"]
    page = open_page(browser, page_server)
    before = [hit["id"] for hit in search_for(page, "blue square")]
    before_url = page.url
    page.fill("#query", "")  # the image alone
    settle(page, "/v1/search", lambda: page.set_input_files("#image-file", str(path)))
    found = [hit["id"] for hit in hits(page)]
    assert found[0] == row["id"] and page.url == f"{page_server}/"
    settle(page, "/v1/search", page.go_back)
    assert [hit["id"] for hit in hits(page)] == before and page.url == before_url
    assert page.locator("#image-preview").is_hidden() and page.input_value("#query") == "blue square"
    settle(page, "/v1/search", page.go_forward)
    assert [hit["id"] for hit in hits(page)] == found and page.input_value("#query") == ""
    assert page.get_attribute("#image-preview-img", "alt") == f"Query image: {path.name}"
    page.wait_for_function("() => document.getElementById('image-preview-img').naturalWidth > 0")


def test_a_server_that_never_answers_is_given_up_on_after_request_timeout_s_and_30_s_and_searched_again(
        browser, encoder, store_path, tmp_path):
    # No answer at all (held by the browser, never passed on): the page says so once the server's own bound on a
    # request has passed (request_timeout_s from /readyz, 5 s here, and 30 s for the rest), on a paused clock.
    settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path, request_timeout_s=5)
    with page_app(settings, encoder, store_path) as url:
        page = open_page_on_a_paused_clock(browser, url)
        held = []
        page.route("**/v1/search", lambda route: held.append(route))
        page.fill("#query", "red circle")
        with page.expect_request("**/v1/search"):
            page.press("#query", "Enter")
        page.clock.run_for(34_000)
        assert page.inner_text("#status") == "Searching…" and page.locator("#error").is_hidden()
        with page.expect_event("requestfailed") as failed:  # the request itself was given up, not only ignored
            page.clock.run_for(2_000)
        page.wait_for_function("() => !document.body.classList.contains('busy')")
        assert page.inner_text("#error") == ("The server did not answer: no answer within 35 s (the server may be "
                                             "overloaded or stuck). Try again.")
        assert page.inner_text("#status") == "The search failed." and page.is_enabled("#search-button")
        assert page.get_attribute("#results", "aria-busy") is None
        assert len(held) == 1 and failed.value.failure == "net::ERR_ABORTED"
        page.unroute("**/v1/search")
        settle(page, "/v1/search", lambda: page.click("#search-button"))
        assert page.locator("#error").is_hidden() and len(hits(page)) == 20


def test_a_thumbnail_with_no_answer_is_given_up_on_after_request_timeout_s_and_30_s_and_shown_missing(
        browser, encoder, store_path, tmp_path):
    # No answer at all (held by the browser, never passed on): the thumbnail is given up on when a search would be
    # (request_timeout_s, 5 s here, and 30 s), on a paused clock, and shown as one that failed to load.
    settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path, request_timeout_s=5)
    with page_app(settings, encoder, store_path) as url:
        page = open_page_on_a_paused_clock(browser, url)
        held = []
        # The first thumbnail asked for is held unanswered; the others go through.
        page.route("**/thumbnail", lambda route: route.continue_() if held else held.append(route))
        assert len(search_for(page, "red circle")) == 20
        page.wait_for_function(THUMBNAILS_LOADED, arg=19)
        page.clock.run_for(34_000)
        assert page.locator("#hits img.thumb").count() == 20 and page.locator("#hits .no-thumb").count() == 0
        with page.expect_event("requestfailed", lambda request: request.url.endswith("/thumbnail")) as failed:
            page.clock.run_for(2_000)
        assert len(held) == 1 and failed.value.url == held[0].request.url and failed.value.failure == "net::ERR_ABORTED"
        page.wait_for_selector("#hits .no-thumb")
        assert page.locator("#hits .no-thumb").inner_text() == "no thumbnail"
        page.wait_for_function(THUMBNAILS_LOADED, arg=19)


def test_a_thumbnail_still_loading_when_a_newer_search_replaces_the_results_is_cancelled_not_shown_missing(
        browser, page_server):
    # A thumbnail of results replaced is of no use: its request is given up then, not left to run to its timeout (on
    # the paused clock nothing else can end it) against the key's rate limit, and it is shown nowhere as missing.
    page = open_page_on_a_paused_clock(browser, page_server)
    held = []
    # The first thumbnail asked for is held unanswered; the others go through.
    page.route("**/thumbnail", lambda route: route.continue_() if held else held.append(route))
    assert len(search_for(page, "red circle")) == 20
    page.wait_for_function(THUMBNAILS_LOADED, arg=19)
    with page.expect_event("requestfailed", lambda request: request.url.endswith("/thumbnail")) as failed:
        newer = search_for(page, "blue square")
    assert len(held) == 1 and failed.value.url == held[0].request.url and failed.value.failure == "net::ERR_ABORTED"
    assert newer[0]["metadata"]["color"] == "blue"
    thumbnails_loaded(page)


def test_a_thumbnail_retry_for_results_replaced_is_cancelled_the_next_queued_is_never_sent_and_new_retries_still_run(
        browser, page_server):
    # Refused thumbnails (429) are retried one at a time: a retry of results replaced, left to run to its timeout,
    # would hold up the new results' retries queued behind it, and one still waiting its turn is of no use either.
    page = open_page_on_a_paused_clock(browser, page_server)
    asked, refused, held, refusals = Counter(), [], [], {"left": 2}

    def answer(route):
        url = route.request.url
        asked[url] += 1
        if asked[url] == 1 and refusals["left"]:
            refusals["left"] -= 1
            refused.append(url)
            route.fulfill(status=429, headers={"Retry-After": "1"}, body="")
        elif asked[url] == 2 and not held:  # the first retry is held unanswered
            held.append(route)
        else:
            route.continue_()

    page.route("**/thumbnail", answer)
    assert len(search_for(page, "red circle")) == 20
    page.wait_for_function(THUMBNAILS_LOADED, arg=18)
    for _ in range(20):  # the clock past Retry-After, until the first refused is asked again
        if held:
            break
        page.clock.run_for(500)
    assert held and held[0].request.url in refused
    [waiting] = [url for url in refused if url != held[0].request.url]
    refusals["left"] = 1  # one of the new results' thumbnails is refused too
    # The held retry's own request: Chromium reports each refusal too as failed (its body is never read).
    with page.expect_event("requestfailed", lambda request: request == held[0].request) as failed:
        newer = search_for(page, "blue square")
    assert failed.value.failure == "net::ERR_ABORTED" and len(refused) == 3
    for _ in range(20):  # the new results' refused thumbnail has its turn after Retry-After
        if asked[refused[2]] == 2:
            break
        page.clock.run_for(500)
    thumbnails_loaded(page)
    shown_again = any(waiting.endswith(f"/{hit['id']}/thumbnail") for hit in newer)
    assert asked[waiting] == 1 + shown_again


def test_a_newer_search_cancels_an_older_one_still_waiting_whose_answer_never_shows(browser, page_server):
    page = open_page(browser, page_server)
    held = []
    # The first search is held unanswered; the second goes through.
    page.route("**/v1/search", lambda route: route.continue_() if held else held.append(route))
    page.fill("#query", "red circle")
    with page.expect_request("**/v1/search"):
        page.press("#query", "Enter")
    with page.expect_event("requestfailed") as failed:
        newer = search_for(page, "blue square")
    assert (failed.value.post_data_json["text"], failed.value.failure) == ("red circle", "net::ERR_ABORTED")
    assert newer[0]["metadata"]["color"] == "blue" and page.input_value("#query") == "blue square"
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Results 1–20')")


def test_an_option_fixed_after_the_server_refused_it_runs_the_search_again(browser, page_server):
    # The refusal names the field and its limit; correcting the field re-runs the search, as any option change does.
    page = open_page(browser, page_server)
    page.fill("#weight-vector", "200")
    page.fill("#query", "red circle")
    settle(page, "/v1/search", lambda: page.press("#query", "Enter"))
    assert page.inner_text("#error") == ("The request was refused: field 'weights.vector' must be a number between 0 "
                                         "and 100, got 200.")
    page.fill("#weight-vector", "0.5")
    settle(page, "/v1/search", lambda: page.press("#weight-vector", "Tab"))
    assert page.locator("#error").is_hidden() and len(hits(page)) == 20


def test_a_page_past_the_end_of_the_ranking_says_so_not_that_nothing_matched(browser, encoder, tmp_path):
    store_path = red_circles(encoder, tmp_path / "store", [{}, {}, {}])
    with page_app(Settings(cache_dir=tmp_path / "cache", store_path=store_path), encoder, store_path) as url:
        page = browser.page
        settle(page, "/v1/search", lambda: page.goto(f"{url}/#text=red+circle&k=20&offset=20"))
        assert not hits(page)
        assert page.inner_text("#empty") == "No results past result 20: the ranking ends there."
        settle(page, "/v1/search", lambda: page.click("#prev-page"))
        assert len(hits(page)) == 3 and page.is_hidden("#empty")


def test_next_reaches_every_result_up_to_max_k_and_the_last_page_says_it_stopped_there(browser, encoder, tmp_path):
    # Before, with max_k 30 and 20 results a page, Next was offered only while a whole page fitted under
    # max_k: results 21-30 were out of reach (and their URL a refused request).
    store_path = red_circles(encoder, tmp_path / "store", [{}] * 35)
    settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path, max_k=30, rerank_candidates=30)
    with page_app(settings, encoder, store_path) as url:
        page = browser.page
        settle(page, "/v1/search", lambda: page.goto(f"{url}/#text=red+circle&k=20"))
        assert page.inner_text("#page-info") == "1–20" and page.is_enabled("#next-page")
        settle(page, "/v1/search", lambda: page.click("#next-page"))
        assert len(hits(page)) == 10 and page.inner_text("#page-info") == "21–30"
        assert "stopped at result 30, the most a search ranks (max_k)" in page.inner_text("#status")
        assert page.is_disabled("#next-page")


def test_a_dropped_file_the_browser_cannot_read_is_named_in_one_error_and_the_page_still_searches(
        browser, page_server, tmp_path):
    # A file deleted between being chosen and being read: the browser's own error, said once ("Error: Error: …" was
    # the String() of an Error), and no search started with it.
    page = open_page(browser, page_server)
    gone = tmp_path / "gone.jpg"
    gone.write_bytes(jpeg(8, 8))
    page.evaluate("() => document.body.append(Object.assign(document.createElement('input'), {type: 'file', id: 'picked'}))")
    page.set_input_files("#picked", str(gone))
    gone.unlink()
    page.evaluate("""() => {
        const transfer = new DataTransfer();
        transfer.items.add(document.getElementById('picked').files[0]);
        document.getElementById('drop-zone').dispatchEvent(
            new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""")
    page.wait_for_selector("#error:not([hidden])")
    error = page.inner_text("#error")
    assert error.startswith("Error: could not read gone.jpg: ") and "Error: Error" not in error, error
    assert page.locator("#image-preview").is_hidden() and page.inner_text("#status") == ""
    assert search_for(page, "red circle")


def test_searching_with_nothing_typed_says_what_to_give_without_calling_the_server_or_saying_it_refused(
        browser, page_server):
    page = open_page(browser, page_server)
    sent = []
    page.on("request", lambda request: sent.append(request.url) if "/v1/search" in request.url else None)
    page.fill("#query", "")
    page.press("#query", "Enter")
    page.wait_for_selector("#error:not(:empty)")
    assert page.inner_text("#error") == ("Nothing to search yet: type some text, choose an image, or pick “More like "
                                         "this” on a result.")
    assert sent == []
