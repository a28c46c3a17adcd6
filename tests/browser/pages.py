"""What browser tests do with the search page: open it, search, wait for its answer, read the results."""

from __future__ import annotations

import json
from pathlib import Path

HITS = """els => els.map(e => ({
    id: e.dataset.id,
    caption: e.querySelector('.caption').textContent,
    stages: [...e.querySelectorAll('.scores dt')].map(d => d.textContent),
    metadata: Object.fromEntries([...e.querySelectorAll('.metadata dt')].map(d => [d.textContent,
                                                                              d.nextElementSibling.textContent])),
}))"""


def manifest_rows(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in corpus.read_text().splitlines()]


def open_page(browser, url: str):
    page = browser.page
    page.goto(f"{url}/")
    page.wait_for_selector("#filters select")  # the store's facets arrived
    return page


def settle(page, endpoint: str, action) -> None:
    """Do `action`, wait for the page's call to `endpoint` and for the page to show its answer."""
    with page.expect_response(lambda response: response.url.endswith(endpoint)):
        action()
    page.wait_for_function("() => !document.body.classList.contains('busy')")


def search_for(page, text: str) -> list[dict]:
    page.fill("#query", text)
    settle(page, "/v1/search", lambda: page.press("#query", "Enter"))
    return hits(page)


def hits(page) -> list[dict]:
    return page.eval_on_selector_all("#hits > li", HITS)


def thumbnails_loaded(page) -> None:
    page.wait_for_function("() => [...document.querySelectorAll('#hits img.thumb')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    assert page.locator("#hits .no-thumb").count() == 0


def only_this_server(browser, url: str) -> None:
    elsewhere = [u for u in browser.requests if not (u.startswith(f"{url}/") or u.startswith(("blob:", "data:")))]
    assert not elsewhere, f"the page asked for things from elsewhere: {elsewhere}"
