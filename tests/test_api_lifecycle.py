"""Durability and hot swap through a real server: an added image survives kill -9 (SQLite and PostgreSQL); a
newly promoted version is swapped in under concurrent queries without losing one; a broken version is
refused with the error in /readyz while the old pair keeps serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.conftest import class_image, jpeg_bytes
from tests.test_api_helpers import build_served_corpus, save_tiny_embedder, start_server, upload


def wait_for(predicate, timeout: float = 30.0, every: float = 0.2):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout}s")


def test_added_image_survives_kill_and_deleted_stays_deleted(database_url: str, tmp_path: Path) -> None:
    settings = build_served_corpus(tmp_path, database_url)
    server = start_server(settings, tmp_path / "server.log")
    image = class_image("yellow", seed=31337)
    try:
        created = upload(server.base_url, jpeg_bytes(image), path="/v1/images", label="yellow",
                         metadata='{"source": "api"}')
        assert created.status_code == 201, created.text
        image_id = created.json()["id"]
        victim = upload(server.base_url, jpeg_bytes(class_image("red", seed=5)), k=1).json()["results"][0]["id"]
        assert httpx.delete(f"{server.base_url}/v1/images/{victim}").status_code == 204
        # Durable before the answers: no graceful shutdown, no chance to flush anything.
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.start()
        ready = httpx.get(f"{server.base_url}/readyz").json()
        assert ready["detail"]["vectors"] == 20  # 20 built + 1 added - 1 deleted
        hits = upload(server.base_url, jpeg_bytes(image), k=25).json()["results"]
        assert hits[0]["id"] == image_id and hits[0]["score"] > 0.99 and hits[0]["metadata"] == {"source": "api"}
        assert victim not in [h["id"] for h in hits] and len(hits) == 20
    finally:
        server.stop()


def test_hot_swap_under_concurrent_queries_loses_nothing(database_url: str, tmp_path: Path) -> None:
    from app.db.models import IndexVersion
    from app.db.session import session_scope
    from app.indexing import BuildReport, publish_index
    from app.registry import active_index, active_model, promote, register_model

    url = database_url
    settings = build_served_corpus(tmp_path, url)
    server = start_server(settings, tmp_path / "server.log")
    base = server.base_url
    first = httpx.get(f"{base}/readyz").json()["detail"]["index_version"]
    query = jpeg_bytes(class_image("green", seed=808))
    outcomes: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            response = upload(base, query, k=5)
            version = response.json().get("index_version", "") if response.status_code == 200 else response.text
            outcomes.append((response.status_code, version))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.5)
        # A new version of the same model: published and promoted by the build job, picked up by the server.
        with session_scope(url) as session:
            model_row = active_model(session)
            session.expunge(model_row)
        report = BuildReport()
        publish_index(settings, model_row, report, force=True)
        second = report.index_version_name
        assert second and second != first
        wait_for(lambda: httpx.get(f"{base}/readyz").json()["detail"]["index_version"] == second)
        time.sleep(0.5)

        # A broken version: a 32-d model promoted with the 64-d index. Refused; the old pair keeps serving.
        broken_model = save_tiny_embedder(tmp_path / "tiny32", dim=32)
        with session_scope(url) as session:
            model32 = register_model(session, broken_model, "tiny32", "resnet10t", 32)
            current = active_index(session)
            broken = IndexVersion(name="index-broken", model_version_id=model32.id, path=current.path,
                                  factory=current.factory, ntotal=current.ntotal)
            session.add(broken)
            session.flush()
            promote(session, broken)
        error = wait_for(lambda: httpx.get(f"{base}/readyz").json()["detail"].get("swap_error"))
        assert error["index_version"] == "index-broken" and "dimension" in error["error"]
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200 and ready.json()["detail"]["index_version"] == second
        time.sleep(0.5)

        # Recovery: promoting a good version swaps again and clears the error.
        report = BuildReport()
        publish_index(settings, model_row, report, force=True)
        third = report.index_version_name
        detail = wait_for(lambda: (d := httpx.get(f"{base}/readyz").json()["detail"])["index_version"] == third
                          and d)
        assert "swap_error" not in detail and detail["last_swap"]["to"] == third
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        server.stop()
    statuses = {status for status, _ in outcomes}
    assert statuses == {200}, [o for o in outcomes if o[0] != 200][:3]
    served = {version for _, version in outcomes}
    assert {first, second, third} <= served and "index-broken" not in served
    assert len(outcomes) > 20
