"""Replicas converge: two real `retrieval serve` processes on one PostgreSQL database and one data volume. An
image added through one is searchable through the other, and an image deleted through the other is gone from the
first one's index, within RETRIEVAL_SWAP_POLL_S, with no rebuild and no new index version."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import class_image, jpeg_bytes, migrated_url
from tests.test_api_helpers import build_served_corpus, start_server, upload

POLL_S = 1.0
SLACK_S = 3.0  # one HTTP round trip and one reconcile on a busy 2-core machine


def _first_time(predicate, timeout: float) -> float:
    """Seconds until `predicate()` first holds; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"replicas did not converge in {timeout}s")


def test_two_replicas_on_one_postgres_converge_on_add_and_delete(tmp_path: Path, request) -> None:
    settings = build_served_corpus(tmp_path, migrated_url("postgresql", request, tmp_path))
    first = start_server(settings, tmp_path / "a.log", swap_poll_s=POLL_S)
    second = start_server(settings, tmp_path / "b.log", swap_poll_s=POLL_S)
    try:
        a, b = first.base_url, second.base_url

        def vectors(base: str) -> int:
            return httpx.get(f"{base}/readyz").json()["detail"]["vectors"]

        before = vectors(b)
        index_version = httpx.get(f"{b}/readyz").json()["detail"]["index_version"]
        image = jpeg_bytes(class_image("yellow", seed=4242))
        created = upload(a, image, path="/v1/images", label="yellow")
        assert created.status_code == 201, created.text
        new_id = created.json()["id"]

        def found_on_second() -> bool:
            hits = upload(b, image, k=1).json()["results"]
            return bool(hits) and hits[0]["id"] == new_id and hits[0]["score"] > 0.99

        assert _first_time(found_on_second, POLL_S + SLACK_S) <= POLL_S + SLACK_S
        assert vectors(b) == before + 1

        assert httpx.delete(f"{b}/v1/images/{new_id}").status_code == 204
        _first_time(lambda: vectors(a) == before, POLL_S + SLACK_S)  # removed from the first one's index too
        hits = upload(a, image, k=before + 5).json()["results"]
        assert new_id not in [h["id"] for h in hits] and len(hits) == before
        # Converged through SQL and the shared shard store, not by publishing a new version.
        assert httpx.get(f"{a}/readyz").json()["detail"]["index_version"] == index_version
    finally:
        first.stop()
        second.stop()
