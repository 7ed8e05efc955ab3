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


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip() or 0) == pid:
            found.append(int(status.parent.name))
    return found


def test_one_server_with_two_workers_converges_and_counts_every_request(tmp_path: Path, request) -> None:
    """`RETRIEVAL_API_WORKERS=2` on the embedded default (SQLite): two worker processes behind one port; an add
    through either is found by every search within RETRIEVAL_SWAP_POLL_S, and /metrics counts both workers'
    requests, whichever answers it."""
    settings = build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path))
    server = start_server(settings, tmp_path / "server.log", swap_poll_s=POLL_S, api_workers=2)
    try:
        base = server.base_url
        workers = [pid for pid in _children(server.proc.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, workers

        image = jpeg_bytes(class_image("yellow", seed=4343))
        created = upload(base, image, path="/v1/images", label="yellow")
        assert created.status_code == 201, created.text
        new_id = created.json()["id"]

        def every_worker_finds_it() -> bool:  # ten searches in a row land on both workers
            return all((hits := upload(base, image, k=1).json()["results"]) and hits[0]["id"] == new_id
                       for _ in range(10))

        _first_time(every_worker_finds_it, POLL_S + SLACK_S)

        for _ in range(12):
            assert httpx.get(f"{base}/healthz").status_code == 200
        exposition = httpx.get(f"{base}/metrics").text
        line = next(x for x in exposition.splitlines()
                    if x.startswith("retrieval_http_requests_total{") and 'route="/healthz"' in x)
        assert float(line.rsplit(" ", 1)[1]) == 12, line
    finally:
        server.stop()
