"""The query page in real headless Chromium (Debian's package, driven by Playwright): a real upload through the
file input, the result grid with scores, labels and thumbnails, and a screenshot saved for a person to look at.
The page is the browser's and the server's: once, on SQLite (tests/test_api.py runs the routes on PostgreSQL)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def require_chromium() -> tuple[str, object]:
    """Chromium's binary and Playwright's sync API; a failure in CI, a skip elsewhere when either is missing."""
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install chromium)")
        pytest.skip("no chromium binary on this machine (apt-get install chromium)")
    return binary, pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def page_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("page")
    url = migrated_url("sqlite", request, tmp)
    settings = build_served_corpus(tmp, url, per_class=3)
    server = start_server(settings, tmp / "server.log")
    yield server
    server.stop()


@contextmanager
def page_at(base_url: str, console_errors: list[str] | None = None, record_forms: bool = False,
            viewport: dict[str, int] | None = None) -> Iterator[Any]:
    """Headless Chromium on the query page at `base_url`, once it says which index it serves: the page, its
    console errors appended to `console_errors`, its form posts recorded (RECORD_FORMS) when asked."""
    binary, playwright_api = require_chromium()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=viewport or {"width": 1200, "height": 900}).new_page()
            if record_forms:
                page.add_init_script(RECORD_FORMS)
            if console_errors is not None:
                page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(base_url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('index')")
            yield page
        finally:
            browser.close()


def test_query_page_upload_shows_result_grid(page_server: LiveServer, tmp_path: Path) -> None:
    query = tmp_path / "my holiday photo (1).jpg"  # a client-side name the server must not use
    class_image("blue", seed=2024, size=128).save(query, quality=92)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "query-page.png"
    console_errors: list[str] = []

    with page_at(page_server.base_url, console_errors) as page:
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
    assert screenshot.stat().st_size > 10_000
    assert console_errors == []


def test_a_heic_photo_is_searched_and_the_page_says_when_it_cannot_show_it(page_server: LiveServer,
                                                                            tmp_path: Path) -> None:
    """Chromium does not show HEIC: the preview would be a blank box; the search still runs on the server."""
    from tests.test_images import heic_bytes

    query = tmp_path / "IMG_0042.HEIC"
    query.write_bytes(heic_bytes(class_image("blue", seed=2024, size=128)))
    with page_at(page_server.base_url) as page:
        page.set_input_files("#file", str(query))
        page.wait_for_selector("#results li", timeout=30_000)
        assert page.locator("#results .label").all_text_contents()[0] == "blue"
        page.wait_for_function("(p => !p.hidden && p.complete && p.naturalWidth > 0)(document.getElementById"
                               "('preview')) || !document.getElementById('drop-text').hidden", timeout=10_000)
        if page.locator("#preview").is_hidden():  # a Chromium that some day shows HEIC needs no note
            assert "IMG_0042.HEIC: this browser cannot show it" in page.locator("#drop-text").text_content()


# Playwright gives no body for a multipart request with a file: the page's fetch records its text fields instead.
RECORD_FORMS = """
window.sentForms = [];
const pageFetch = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body instanceof FormData) {
    window.sentForms.push(Object.fromEntries([...options.body.entries()].filter(([, v]) => typeof v === "string")));
  }
  return pageFetch(url, options);
};
"""


LONG_LABEL = "Yorkshire_terrier_with_a_label_far_too_long_for_any_result_card"


def test_page_region_box_more_like_this_and_captions(page_server: LiveServer, tmp_path: Path) -> None:
    """Issue 17's tools on the page: a box dragged on the query image searches with that region, "more like
    this" on a result asks for its neighbours, the effort and diversity selectors travel with the query, and a
    long label ellipsizes while the score stays whole; screenshots at desktop and phone widths."""
    import httpx

    stored = tmp_path / "stored.jpg"
    class_image("red", seed=4040, size=128).save(stored, quality=92)
    added = httpx.post(f"{page_server.base_url}/v1/images", data={"label": LONG_LABEL},
                       files={"file": ("stored.jpg", stored.read_bytes(), "image/jpeg")}, timeout=60)
    assert added.status_code == 201, added.text
    query = tmp_path / "query.jpg"
    class_image("red", seed=4041, size=160).save(query, quality=92)
    ARTIFACTS.mkdir(exist_ok=True)
    console_errors: list[str] = []

    wide = {"width": 1280, "height": 900}
    with page_at(page_server.base_url, console_errors, record_forms=True, viewport=wide) as page:
        page.fill("#k", "4")
        page.select_option("#effort", "exact")
        with page.expect_request("**/v1/search") as first:
            page.set_input_files("#file", str(query))
        assert first.value.method == "POST"
        assert page.evaluate("window.sentForms.at(-1)")["effort"] == "exact"
        page.wait_for_selector("#results li .more-like-this", timeout=30_000)
        assert page.locator("#results li").count() == 4

        # Captions: the long label is cut with an ellipsis inside its card, the score is whole and inside.
        long_card = page.locator("#results li", has=page.locator(f".label[title='{LONG_LABEL}']"))
        assert long_card.count() == 1
        label = long_card.locator(".label")
        assert label.evaluate("e => e.scrollWidth > e.clientWidth")
        assert label.evaluate("e => getComputedStyle(e).textOverflow") == "ellipsis"
        for card in page.locator("#results li").all():
            text = card.locator(".score").text_content()
            assert len(text) == 5 and float(text) <= 1.0, text
            assert card.locator(".score").evaluate(
                "e => e.getBoundingClientRect().right <= e.closest('li').getBoundingClientRect().right")

        # A box dragged on the query image searches again with that region (relative coordinates).
        area = page.locator("#region-img").bounding_box()
        assert area is not None
        with page.expect_response("**/v1/search") as boxed:
            page.mouse.move(area["x"] + area["width"] * 0.1, area["y"] + area["height"] * 0.1)
            page.mouse.down()
            page.mouse.move(area["x"] + area["width"] * 0.4, area["y"] + area["height"] * 0.4, steps=4)
            page.mouse.move(area["x"] + area["width"] * 0.6, area["y"] + area["height"] * 0.6, steps=4)
            page.mouse.up()
        assert boxed.value.status == 200
        assert page.evaluate("window.sentForms.at(-1)")["box"] == "0.1000,0.1000,0.6000,0.6000"
        assert page.locator("#region-box").is_visible()
        page.wait_for_function("document.getElementById('message').textContent.includes('results in')")
        page.screenshot(path=str(ARTIFACTS / "query-page-box.png"), full_page=True)

        # "More like this" on the first result: its neighbours, itself excluded.
        first_id = page.locator("#results li").first.get_attribute("data-id")
        with page.expect_response(f"**/v1/images/{first_id}/similar?*") as similar:
            page.locator("#results li .more-like-this").first.click()
        assert similar.value.status == 200
        page.wait_for_function("document.getElementById('message').textContent.includes('more like image')")
        shown = page.locator("#results li").evaluate_all("cards => cards.map(c => c.dataset.id)")
        assert len(shown) == 4 and first_id not in shown
        page.screenshot(path=str(ARTIFACTS / "query-page-more-like-this.png"), full_page=True)

        # Near-duplicates of a result: its neighbours at or above the service's threshold (none here but
        # itself, which is excluded): the page says so without an error.
        with page.expect_response("**/similar?*min_score*") as near:
            page.locator("#results li .near-duplicates").first.click()
        assert near.value.status == 200
        page.wait_for_function("document.getElementById('message').textContent.includes('near-duplicates')")

        # Every near-duplicate group of the catalogue (the tiny random embedder scores one class's noisy
        # variants as near-identical), each with its keeper marked.
        with page.expect_response("**/v1/duplicates?*") as listed:
            page.click("#duplicate-groups")
        groups = listed.value.json()["groups"]
        assert listed.value.status == 200 and groups
        page.wait_for_function("document.getElementById('message').textContent.includes('near-duplicate groups')")
        assert page.locator("#results .group-head").count() == len(groups)
        assert page.locator("#results li.keeper").count() == len(groups)
        assert page.locator("#more").is_visible() == (listed.value.json()["next_cursor"] is not None)
        page.screenshot(path=str(ARTIFACTS / "query-page-duplicate-groups.png"), full_page=True)

        # Phone width: the grid, captions and tools still fit (no horizontal scrolling).
        page.set_viewport_size({"width": 390, "height": 844})
        phone_query = tmp_path / "phone.jpg"
        class_image("green", seed=4042, size=160).save(phone_query, quality=92)
        with page.expect_response("**/v1/search"):
            page.set_input_files("#file", str(phone_query))
        page.wait_for_selector("#results li .more-like-this", timeout=30_000)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(ARTIFACTS / "query-page-phone.png"), full_page=True)
    assert console_errors == []


def test_query_page_shows_heatmaps_over_the_query_and_each_result(page_server: LiveServer, tmp_path: Path) -> None:
    """On by default: a heatmap canvas over the query and over every result, drawn with some heat; the toggle
    hides them, and a search with it off asks for no heatmaps."""
    query = tmp_path / "query.jpg"
    class_image("green", seed=77, size=160).save(query, quality=92)
    ARTIFACTS.mkdir(exist_ok=True)
    console_errors: list[str] = []
    drawn = """() => [...document.querySelectorAll('canvas.heat')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let alpha = 0; for (let i = 3; i < d.length; i += 4) alpha = Math.max(alpha, d[i]);
        return {w: c.width, alpha, hidden: c.hidden}; })"""
    with page_at(page_server.base_url, console_errors) as page:
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
    assert console_errors == []


def test_swagger_ui_renders_with_no_other_host_reachable(page_server: LiveServer) -> None:
    """/docs on an offline host: every request for another host is refused, and the operations still show."""
    binary, playwright_api = require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    elsewhere: list[str] = []
    console_errors: list[str] = []

    def only_this_host(route, req) -> None:
        if req.url.startswith(page_server.base_url):
            route.continue_()
        else:
            elsewhere.append(req.url)
            route.abort()

    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.route("**/*", only_this_host)
            page.goto(page_server.base_url + "/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_text_contents()
            assert {"/v1/search", "/v1/images", "/v1/jobs"} <= {path.replace("\u200b", "") for path in paths}
            assert "Image retrieval" in page.locator(".info .title").text_content()
            page.screenshot(path=str(ARTIFACTS / "swagger-ui.png"))
        finally:
            browser.close()
    assert elsewhere == [] and console_errors == []


def test_the_results_field_follows_the_servers_max_k(request: pytest.FixtureRequest,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """With RETRIEVAL_MAX_K=8 the page sent k=12 (and offered up to 100): every search was a 422. It now reads the
    limit from /readyz: the field starts at 8 at most, a larger k is brought down to it, and "More results" asks
    for what is left below it instead of a page the server refuses."""
    tmp = tmp_path_factory.mktemp("page-max-k")
    settings = build_served_corpus(tmp, migrated_url("sqlite", request, tmp), per_class=3)  # 12 images
    server = start_server(settings, tmp / "server.log", max_k=8)
    queries = []
    for seed in (5050, 5051, 5052):
        queries.append(tmp / f"query-{seed}.jpg")
        class_image("blue", seed=seed, size=128).save(queries[-1], quality=92)
    console_errors: list[str] = []
    try:
        with page_at(server.base_url, console_errors, record_forms=True) as page:
            assert page.get_attribute("#k", "max") == "8" and page.input_value("#k") == "8"

            with page.expect_response("**/v1/search") as first:
                page.set_input_files("#file", str(queries[0]))
            assert first.value.status == 200 and page.evaluate("window.sentForms.at(-1)")["k"] == "8"
            page.wait_for_function("document.getElementById('message').textContent.includes('8 results in')")
            assert page.locator("#results li").count() == 8 and not page.locator("#more").is_visible()

            # Pages of 5: the second asks for the 3 left below the limit.
            page.fill("#k", "5")
            with page.expect_response("**/v1/search"):
                page.set_input_files("#file", str(queries[1]))
            page.wait_for_function("document.getElementById('message').textContent.includes('5 results in')")
            assert page.locator("#more").is_visible()
            with page.expect_response("**/v1/search") as second:
                page.click("#more")
            assert second.value.status == 200
            sent = page.evaluate("window.sentForms.at(-1)")
            assert (sent["k"], sent["offset"]) == ("3", "5")
            page.wait_for_function("document.getElementById('message').textContent === '8 results'")
            assert page.locator("#results li").count() == 8 and not page.locator("#more").is_visible()

            # A k over the limit typed in is brought down to it, and shown so.
            page.fill("#k", "50")
            with page.expect_response("**/v1/search") as third:
                page.set_input_files("#file", str(queries[2]))
            assert third.value.status == 200 and page.evaluate("window.sentForms.at(-1)")["k"] == "8"
            assert page.input_value("#k") == "8"
            page.wait_for_selector("#results li .more-like-this", timeout=30_000)
            with page.expect_response("**/similar?*") as similar:
                page.locator("#results li .more-like-this").first.click()
            assert similar.value.status == 200 and "k=8" in similar.value.url
            assert not page.locator("#message.error").is_visible()
    finally:
        server.stop()
    assert console_errors == []
