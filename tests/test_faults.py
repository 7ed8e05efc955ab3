"""Faults beyond kill -9, each injected for real: PostgreSQL stopped under query and write load (503s with a JSON
error in bounded time, /readyz not ready, recovery without a restart, no acknowledged write lost); the data volume
full (a size-limited tmpfs: 507 and nothing half-written, the build stops with a clear error and resumes once
space is freed); the active index file corrupt or missing at start (fallback named in /readyz, verify names the
problem) and at swap (the old pair keeps serving)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import class_image, jpeg_bytes, migrated_url
from tests.postgres import PostgresServer, find_bin_dir
from tests.test_api_helpers import app_client, build_served_corpus, start_server, upload
from tests.test_api_lifecycle import wait_for
from tests.test_indexing import make_corpus


@pytest.mark.skipif(find_bin_dir() is None, reason="PostgreSQL binaries not installed")
def test_postgres_stopped_under_load_then_back(tmp_path: Path) -> None:
    from app.db.migrate import upgrade

    pg = PostgresServer()  # its own server: stopping it must not touch the other tests' databases
    pg.start()
    try:
        url = pg.create_database()
        upgrade(url)
        settings = build_served_corpus(tmp_path, url, per_class=2)
        server = start_server(settings, tmp_path / "server.log")
        base = server.base_url
        outcomes: list[tuple[str, int, float, dict]] = []
        acknowledged: dict[int, bytes] = {}
        stop = threading.Event()

        def client_loop(kind: str, seed0: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                if kind == "add":
                    data = jpeg_bytes(class_image("green", seed=seed0 + n))
                    response = upload(base, data, path="/v1/images")
                else:
                    response = upload(base, jpeg_bytes(class_image("red", seed=n)), k=3)
                body = response.json()
                outcomes.append((kind, response.status_code, time.monotonic() - started, body))
                if response.status_code == 201:
                    acknowledged[body["id"]] = data

        threads = [threading.Thread(target=client_loop, args=(kind, 10_000 * i))
                   for i, kind in enumerate(["search", "search", "add", "add"])]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.5)
            pg.pause()
            down = wait_for(lambda: (r := httpx.get(f"{base}/readyz", timeout=20)).status_code == 503 and r.json(),
                            timeout=20)
            assert down["detail"]["database"].startswith("unreachable")
            time.sleep(2)
            pg.resume()
            wait_for(lambda: httpx.get(f"{base}/readyz", timeout=20).status_code == 200, timeout=30)
            time.sleep(1)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        print(f"\nPostgreSQL stopped under load: {len(outcomes)} requests, {len(acknowledged)} adds acknowledged, "
              f"statuses {sorted((s, sum(1 for o in outcomes if o[1] == s)) for s in {o[1] for o in outcomes})}, "
              f"slowest {max(o[2] for o in outcomes):.2f} s")  # the figures in docs/reliability.md (pytest -s)
        statuses = {status for _, status, _, _ in outcomes}
        assert statuses <= {200, 201, 503}, sorted(statuses)
        failures = [body for _, status, _, body in outcomes if status == 503]
        assert failures and all(b["error"] == "database_unavailable" for b in failures), failures[:3]
        assert max(seconds for _, _, seconds, _ in outcomes) < 15  # bounded, never a hang
        assert {k for k, s, _, _ in outcomes if s in (200, 201)} == {"search", "add"}
        # Every acknowledged add is there after the outage, found by its own image.
        for image_id, data in acknowledged.items():
            assert httpx.get(f"{base}/v1/images/{image_id}").status_code == 200
            hits = upload(base, data, k=3).json()["results"]
            assert image_id in [h["id"] for h in hits if h["score"] >= hits[0]["score"] - 1e-3]
        server.stop()
    finally:
        pg.stop()


@pytest.fixture
def small_volume(tmp_path: Path):
    """A 96 MiB tmpfs: a data volume that really fills up. Needs root (mount)."""
    volume = tmp_path / "volume"
    volume.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(volume)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield volume
    subprocess.run(["umount", "-l", str(volume)], check=False)


def _fill(volume: Path) -> Path:
    """Write zeros until not one more byte fits (shrinking the chunk down to one byte)."""
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def test_full_data_volume(tmp_path: Path, small_volume: Path, run_cli) -> None:
    from app.db.migrate import upgrade

    data = small_volume / "data"
    data.mkdir()
    upgrade(url := f"sqlite:///{data / 'retrieval.db'}")
    settings = build_served_corpus(small_volume, url, per_class=2, runtime="torch")  # its data dir: data
    more = make_corpus(tmp_path / "more", 3)
    with app_client(settings) as client:
        total = client.get("/v1/images").json()["total"]
        filler = _fill(small_volume)
        for seed in range(3):
            response = upload(client, jpeg_bytes(class_image("blue", seed=500 + seed)), path="/v1/images")
            assert response.status_code in (503, 507), response.text
            assert response.json()["error"] in ("insufficient_storage", "database_unavailable")
        assert response.status_code == 507 and "full" in response.json()["message"]
        assert client.get("/v1/images").json()["total"] == total  # no row without its file and embedding
        leftovers = [p for d in ("images", "embeddings") for p in (data / d).rglob(".*")]
        assert leftovers == []
        build = run_cli(settings, "index", "build", str(more), "--no-progress")
        assert build.returncode == 1 and "data volume is full" in build.stderr, build.stderr[-2000:]
        filler.unlink()
        response = upload(client, jpeg_bytes(class_image("blue", seed=500)), path="/v1/images")
        assert response.status_code == 201, response.text
    build = run_cli(settings, "index", "build", str(more), "--no-progress")
    assert build.returncode == 0, build.stderr[-2000:]
    assert run_cli(settings, "index", "verify").returncode == 0
    with app_client(settings) as client:
        # make_corpus(3) repeats the served corpus's 2 images per class (deduplicated): 4 new ones.
        assert client.get("/readyz").json()["detail"]["vectors"] == total + 1 + 4


def _corrupt(version_dir: Path) -> None:
    (version_dir / "index.faiss").write_bytes(b"not a faiss index" * 10)


def test_corrupt_or_missing_index_file(tmp_path: Path, run_cli, request) -> None:
    from app.indexing.compact import compact_index
    from app.indexing.pipeline import rebuild_index
    from index import versions

    settings = build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path), per_class=2)
    query = jpeg_bytes(class_image("yellow", seed=4711))
    with app_client(settings, compact_every=0, compact_after_s=0) as client:
        added = upload(client, query, path="/v1/images").json()["id"]
    report = compact_index(settings, "test")  # the active version now has a good predecessor
    active = settings.indexes_dir / report.published
    _corrupt(active)
    verify = run_cli(settings, "index", "verify")
    assert verify.returncode == 1 and "cannot be read" in verify.stderr
    with app_client(settings) as client:  # at start: the previous version, brought up to date
        detail = client.get("/readyz").json()["detail"]
        assert client.get("/readyz").status_code == 200 and "previous version" in detail["fallback"]
        assert detail["vectors"] == 9
        assert upload(client, query, k=1).json()["results"][0]["id"] == added
    healed = compact_index(settings, "test")  # compaction over an unreadable version rebuilds it
    assert healed.published and "rebuilt from stored embeddings" in healed.message
    assert run_cli(settings, "index", "verify").returncode == 0
    for version in settings.indexes_dir.iterdir():  # every version gone: rebuilt from the embedding store
        if version.is_dir():
            (version / "index.faiss").unlink()
    assert "missing" in run_cli(settings, "index", "verify").stderr
    with app_client(settings) as client:
        detail = client.get("/readyz").json()["detail"]
        assert "rebuilt from the embedding store" in detail["fallback"] and detail["vectors"] == 9
        assert upload(client, query, k=1).json()["results"][0]["id"] == added
        # At swap: a newly promoted version whose file is corrupt is refused; the served pair stays.
        real_publish = versions.publish

        def publish_corrupt(indexes_dir, name, write):
            path = real_publish(indexes_dir, name, write)
            _corrupt(path)
            return path

        versions.publish = publish_corrupt
        try:
            broken = rebuild_index(settings, progress=False).index_version_name
        finally:
            versions.publish = real_publish
        detail = wait_for(lambda: (d := client.get("/readyz").json()["detail"]).get("swap_error") and d)
        assert detail["swap_error"]["index_version"] == broken and detail["vectors"] == 9
        assert upload(client, query, k=1).json()["results"][0]["id"] == added
    assert np.load(settings.indexes_dir / broken / "ids.npy").size == 9
