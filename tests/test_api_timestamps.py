"""Every timestamp the API returns is UTC in one form (`2024-05-01T12:00:00.000000Z`), and the time a write
returns reads back as the same string: on SQLite (naive datetimes come back) and on PostgreSQL in a session
whose TimeZone is not UTC (aware datetimes come back with that zone's offset)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import DATABASES, class_image, jpeg_bytes, migrated_url
from tests.test_api_helpers import app_client, build_served_corpus, upload

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def recent(stamp: str) -> bool:
    """In the form above and within minutes of now: a zone's offset relabelled as UTC would be hours off."""
    return bool(STAMP.fullmatch(stamp)) and abs(datetime.fromisoformat(stamp) - datetime.now(UTC)) < timedelta(
        minutes=10)


@pytest.mark.parametrize("kind", DATABASES)
def test_timestamps_are_utc_and_read_back_as_written(kind: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    url = migrated_url(kind, request, tmp_path)
    if kind == "postgresql":
        url += "?options=-c%20timezone%3DAsia/Kolkata"  # +05:30: a server not set to UTC
    settings = build_served_corpus(tmp_path, url, per_class=1)
    with app_client(settings) as client:
        created = client.post("/v1/jobs", json={"kind": "rebuild_index"})
        assert created.status_code == 201, created.text
        job = created.json()
        assert recent(job["created_at"]), job
        assert client.get(f"/v1/jobs/{job['id']}").json()["created_at"] == job["created_at"]
        assert [j["created_at"] for j in client.get("/v1/jobs").json()["jobs"]] == [job["created_at"]]
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert recent(cancelled["finished_at"]), cancelled
        assert client.get(f"/v1/jobs/{job['id']}").json()["finished_at"] == cancelled["finished_at"]

        added = upload(client, jpeg_bytes(class_image("blue", seed=77)), path="/v1/images")
        assert added.status_code == 201, added.text
        image = added.json()
        assert recent(image["created_at"]), image
        assert client.get(f"/v1/images/{image['id']}").json()["created_at"] == image["created_at"]
        listed = {i["id"]: i["created_at"] for i in client.get("/v1/images").json()["items"]}
        assert listed[image["id"]] == image["created_at"]
        assert all(recent(stamp) for stamp in listed.values())

        for path in ("/v1/models", "/v1/indexes"):
            (version,) = client.get(path).json()["items"]
            assert recent(version["created_at"]) and recent(version["activated_at"]), version
