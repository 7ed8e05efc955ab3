"""GET /v1/duplicates on a catalogue larger than one request may scan (app.duplicates.SCAN_LIMIT, lowered here):
pages come back short or empty with a next_cursor, and following the cursors lists every group once. In-process
on SQLite with the tiny random embedder (whose scores put one class's noisy variants near 1.0): what is
checked is the paging, not the embedder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, migrated_url
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


SCHEMA_SCRIPT = """
import json
from app.main import create_app
from app.settings import Settings
app = create_app(Settings(data_dir=DATA, database_url="sqlite:///" + DATA + "/x.db"))
print(json.dumps({p["name"]: p for p in app.openapi()["paths"]["/v1/duplicates"]["get"]["parameters"]}))
"""


def test_its_parameters_build_without_a_pydantic_warning(tmp_path: Path) -> None:
    """A fresh process (route schemas are made at import) with every UserWarning an error: no pydantic
    UnsupportedFieldAttributeWarning, and the parameters are still what docs/api.md documents."""
    script = f"DATA = {str(tmp_path)!r}\n{SCHEMA_SCRIPT}"
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    params = json.loads(done.stdout)
    assert not params["threshold"]["required"] and not params["cursor"]["required"]
    assert params["limit"]["schema"]["default"] == 20 and params["limit"]["schema"]["maximum"] == 100
    threshold = params["threshold"]["schema"]["anyOf"][0]
    assert (threshold["minimum"], threshold["maximum"]) == (-1.0, 1.0)
