"""The query page in real headless Chromium (Debian's package, driven by Playwright): a real upload through the
file input, the result grid with scores, labels and thumbnails, and a screenshot saved for a person to look at.
The page is the browser's and the server's: once, on SQLite (tests/test_api.py runs the routes on PostgreSQL)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, class_image, migrated_url
from tests.live_server import LiveServer
from tests.test_api_helpers import build_served_corpus, start_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
ARTIFACTS = REPO / "test-artifacts"


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def page_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("page")
    url = migrated_url("sqlite", request, tmp)
    settings = build_served_corpus(tmp, url, per_class=3)
    server = start_server(settings, tmp / "server.log")
    yield server
    server.stop()


def test_query_page_upload_shows_result_grid(page_server: LiveServer, tmp_path: Path) -> None:
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install chromium)")
        pytest.skip("no chromium binary on this machine (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")

    query = tmp_path / "my holiday photo (1).jpg"  # a client-side name the server must not use
    class_image("blue", seed=2024, size=128).save(query, quality=92)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "query-page.png"
    console_errors: list[str] = []

    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(page_server.base_url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('index')")
            page.fill("#k", "6")
            page.set_input_files("#file", str(query))
            page.wait_for_selector("#results li", timeout=30_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000)
            cards = page.locator("#results li")
            assert cards.count() == 6
            labels = page.locator("#results .label").all_text_contents()
            scores = [float(s) for s in page.locator("#results .score").all_text_contents()]
            assert labels[0] == "blue" and scores == sorted(scores, reverse=True)
            assert "6 results" in page.locator("#message").text_content()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    assert console_errors == []


def test_query_page_shows_heatmaps_over_the_query_and_each_result(page_server: LiveServer, tmp_path: Path) -> None:
    """On by default: a heatmap canvas over the query and over every result, drawn with some heat; the toggle
    hides them, and a search with it off asks for no heatmaps."""
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install chromium)")
        pytest.skip("no chromium binary on this machine (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    query = tmp_path / "query.jpg"
    class_image("green", seed=77, size=160).save(query, quality=92)
    ARTIFACTS.mkdir(exist_ok=True)
    console_errors: list[str] = []
    drawn = """() => [...document.querySelectorAll('canvas.heat')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let alpha = 0; for (let i = 3; i < d.length; i += 4) alpha = Math.max(alpha, d[i]);
        return {w: c.width, alpha, hidden: c.hidden}; })"""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(page_server.base_url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('index')")
            assert page.is_checked("#explain")
            page.fill("#k", "4")
            page.set_input_files("#file", str(query))
            page.wait_for_function("document.querySelectorAll('canvas.heat').length === 5", timeout=30_000)
            page.wait_for_function(f"({drawn})().every(c => c.w > 1 && c.alpha > 0)", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "query-page-heatmaps.png"), full_page=True)
            page.uncheck("#explain")
            assert all(c["hidden"] for c in page.evaluate(drawn))
            again = tmp_path / "another.jpg"  # the same file again fires no change event
            class_image("red", seed=78, size=160).save(again, quality=92)
            with page.expect_request("**/v1/search") as sent:
                page.set_input_files("#file", str(again))
            assert "explain" not in (sent.value.post_data or "")
            page.wait_for_function("document.querySelectorAll('canvas.heat').length === 0", timeout=30_000)
        finally:
            browser.close()
    assert console_errors == []
