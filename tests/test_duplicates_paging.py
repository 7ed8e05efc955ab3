"""GET /v1/duplicates on a catalogue larger than one request may scan (app.duplicates.SCAN_LIMIT, lowered here):
pages come back short or empty with a next_cursor, and following the cursors lists every group once. In-process
on SQLite with the tiny random embedder (whose scores put one class's noisy variants near 1.0): what is
checked is the paging, not the embedder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import migrated_url
from tests.test_api_helpers import app_client, build_served_corpus


def test_pages_stay_bounded_and_list_every_group_once(request: pytest.FixtureRequest, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from app import duplicates

    settings = build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path), per_class=3)
    with app_client(settings) as client:
        everything = client.get("/v1/duplicates", params={"threshold": 0.99, "limit": 100}).json()
        assert everything["next_cursor"] is None
        monkeypatch.setattr(duplicates, "SCAN_LIMIT", 2)
        monkeypatch.setattr(duplicates, "SCAN_BATCH", 2)
        pages, cursor = [], None
        for _ in range(20):
            params = {"threshold": 0.99, "limit": 100} | ({"cursor": cursor} if cursor is not None else {})
            page = client.get("/v1/duplicates", params=params).json()
            pages.append(page)
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert cursor is None and len(pages) == 6  # 12 images, 2 scanned per request
        listed = [sorted(i["id"] for i in g["images"]) for p in pages for g in p["groups"]]
        assert listed == [sorted(i["id"] for i in g["images"]) for g in everything["groups"]]
        assert any(not p["groups"] and p["next_cursor"] for p in pages)  # a short page still points on
        bad = client.get("/v1/duplicates", params={"limit": 0})
        assert bad.status_code == 422 and "limit" in bad.json()["message"]
