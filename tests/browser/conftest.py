"""Browser tests: Playwright for Python driving Debian's Chromium (`apt-get install chromium`; Playwright's
own browser download is never used), headless, against the real server.

Chromium runs as CI does, as root: without a sandbox and without the background services that would
call out to the network (updates, sync, field trials) — the machine may have no route out, and the
page must not need one: every request a page makes is recorded and must go to the server under test.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from werkzeug.serving import make_server

from sidecar.model.tiny_model import checkpoint_path
from tests.support import gunicorn_server

CHROMIUM = Path(os.environ.get("CLIP_SIDECAR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                 "--metrics-recording-only", "--no-default-browser-check", "--disable-features=Translate,MediaRouter"]
VIEWPORT = {"width": 1280, "height": 1000}


def _missing(reason: str) -> None:
    """Skip where the browser is not installed; under CI (scripts/setup installs it) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        _missing(f"no Chromium at {CHROMIUM} (scripts/setup installs Debian's package as root: apt-get install "
                 "chromium; CLIP_SIDECAR_CHROMIUM names another binary)")
    with sync_playwright() as driver:
        yield driver


@dataclass
class Browser:
    """One Chromium with a fresh profile, one page, and every URL that page asked for."""

    page: object
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    folder: Path = Path(".")

    def screenshot(self, name: str) -> Path:
        path = self.folder / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def browser(playwright, tmp_path) -> Iterator[Browser]:
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport=VIEWPORT, locale="en-GB")
    context.set_default_timeout(30_000)
    page = context.pages[0] if context.pages else context.new_page()
    opened = Browser(page=page, folder=tmp_path)
    context.on("request", lambda request: opened.requests.append(request.url))
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert not opened.errors, f"the page raised JavaScript errors: {opened.errors}"


def server_env(store_path: Path, cache_dir: Path, test_cache_dir: Path) -> dict[str, str]:
    return {"SIDECAR_STORE_PATH": str(store_path), "SIDECAR_CACHE_DIR": str(cache_dir),
            "SIDECAR_PRETRAINED": str(checkpoint_path(test_cache_dir))}


@pytest.fixture(scope="session")
def page_server(store_path, test_cache_dir, tmp_path_factory) -> Iterator[str]:
    """`clip-sidecar serve` (gunicorn) on the test corpus's embedded store (thumbnails included)."""
    folder = tmp_path_factory.mktemp("page-server")
    with gunicorn_server(server_env(store_path, folder / "cache", test_cache_dir), folder / "server.log") as url:
        yield url


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """A Flask app on a loopback port (werkzeug's threaded server) until the block ends; yields its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="page-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
