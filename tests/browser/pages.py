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


def open_page_on_a_paused_clock(browser, url: str):
    """The page on a clock that moves only when the test runs it (page.clock.run_for): timeouts fire when a test
    says. Paused once /readyz answered, which sets how long the page waits for an answer (its request_timeout_s)."""
    page = browser.page
    page.clock.install()
    open_page(browser, url)
    page.wait_for_function("() => document.getElementById('store-info').textContent.includes('documents')")
    page.clock.pause_at(page.evaluate("Date.now()") + 1000)
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
