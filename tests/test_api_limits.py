"""Micro-batching, overload and auth: concurrent queries share forward passes; a full queue answers 503 with
Retry-After (and the server keeps serving: a real uvicorn server, where the queue fills under real HTTP); API keys
are stored hashed and their scopes are enforced (in-process: auth is the app's, not the server's). Batching under
many real clients is in tests/test_api_lifecycle.py, on the live server there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.batching import MicroBatcher, QueueFull
from tests.conftest import class_image, jpeg_bytes, migrated_url
from tests.live_server import LiveServer
from tests.test_api_helpers import app_client, build_served_corpus, save_tiny_embedder, start_server, upload


class SlowForward:
    """Stands in for a deployment: records batch sizes, takes `delay` seconds per pass."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.batches: list[int] = []

    def forward_batch(self, pixels: torch.Tensor) -> np.ndarray:
        time.sleep(self.delay)
        self.batches.append(len(pixels))
        return pixels.flatten(1).numpy() * 2


def test_concurrent_queries_are_coalesced_and_answered_in_order() -> None:
    async def scenario() -> tuple[list[np.ndarray], list[int]]:
        target = SlowForward(0.05)
        batcher = MicroBatcher(max_batch_size=8, max_wait_ms=20, max_queue=64)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.embed(target, torch.full((1, 2, 2), float(i)))
                                             for i in range(20)))
        finally:
            await batcher.stop()
        return results, target.batches

    results, batches = asyncio.run(scenario())
    assert sum(batches) == 20 and max(batches) == 8 and len(batches) <= 4
    for i, vector in enumerate(results):
        assert np.all(vector == 2 * i)  # every caller gets its own row back


def test_full_queue_refuses_instead_of_growing() -> None:
    async def scenario() -> tuple[int, int]:
        target = SlowForward(0.2)
        batcher = MicroBatcher(max_batch_size=1, max_wait_ms=0, max_queue=3)
        await batcher.start()
        try:
            outcomes = await asyncio.gather(*(batcher.embed(target, torch.zeros(1, 2, 2)) for _ in range(10)),
                                            return_exceptions=True)
        finally:
            await batcher.stop()
        refused = sum(isinstance(o, QueueFull) for o in outcomes)
        return refused, sum(isinstance(o, np.ndarray) for o in outcomes)

    refused, answered = asyncio.run(scenario())
    # All ten arrive before the batcher runs: three fit the queue, the other seven are refused at once.
    assert refused == 7 and answered == 3


@pytest.fixture(scope="module")
def slow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real server whose forward pass is slow (a 448-px model on CPU) with a tiny queue and no batching. The
    queue is the batcher's, not SQL's: SQLite only."""
    tmp = tmp_path_factory.mktemp("overload")
    url = migrated_url("sqlite", request, tmp)
    settings = build_served_corpus(tmp, url, per_class=2)
    # Swap in a slow checkpoint under the same model directory name: same dim, so the index still fits.
    import shutil

    from app.db.models import ModelVersion
    from app.db.session import session_scope
    from app.registry import active_model
    from models.checkpoint import save_checkpoint
    from models.embedder import EmbedderConfig, TimmEmbedder

    with session_scope(url) as session:
        model: ModelVersion = active_model(session)
        path = Path(model.path)
    shutil.rmtree(path)
    config = EmbedderConfig(arch="timm", backbone="resnet10t", dim=64, image_size=448, resize_size=448)
    save_checkpoint(TimmEmbedder(config), path)
    # Eager torch: slow on purpose, and no export or parity check to wait for at start-up.
    server = start_server(settings, tmp / "server.log", max_batch_size=1, max_batch_wait_ms=0, max_queue=2,
                          retry_after_s=3, runtime="torch")
    yield server
    server.stop()


def test_overload_answers_503_with_retry_after_not_a_crash(slow_server: LiveServer) -> None:
    server = slow_server
    query = jpeg_bytes(class_image("red", seed=3))
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda _: upload(server.base_url, query, k=3), range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 3, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "3" and refused.json()["error"] == "overloaded"
    # Still healthy and serving afterwards.
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    assert upload(server.base_url, query, k=3).status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics").text
    rejected = next(line for line in metrics.splitlines() if line.startswith("retrieval_rejected_total"))
    assert float(rejected.split()[-1]) == statuses.count(503)


def test_open_reads_with_auth_on(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from app.auth import create_api_key

    url = migrated_url("sqlite", request, tmp_path)
    settings = build_served_corpus(tmp_path, url, per_class=2)
    with app_client(settings, auth_enabled=True, open_reads=True) as client:
        assert client.get("/v1/images").status_code == 200  # reads are open
        image = jpeg_bytes(class_image("green", seed=12))
        denied = upload(client, image, path="/v1/images")
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "ApiKey"
        _, writer = create_api_key(url, "ci", "write")
        created = upload(client, image, path="/v1/images", headers={"X-API-Key": writer})
        assert created.status_code == 201, created.text


def test_api_key_scopes_with_closed_reads(database_url: str, tmp_path: Path) -> None:
    """Keys are rows looked up by hash and revoked in SQL: on both databases."""
    from sqlalchemy import select

    from app.auth import create_api_key, hash_key, revoke_api_key
    from app.db.models import ApiKey
    from app.db.session import session_scope

    url = database_url
    settings = build_served_corpus(tmp_path, url, per_class=2)
    _, reader = create_api_key(url, "reader", "read")
    _, writer = create_api_key(url, "writer", "write")
    both_id, both = create_api_key(url, "admin", "read,write")
    with session_scope(url) as session:
        stored = {row.name: row for row in session.scalars(select(ApiKey))}
        assert stored["reader"].key_hash == hash_key(reader) and reader not in stored["reader"].key_hash
        assert stored["admin"].scopes == "read,write"
    with app_client(settings, auth_enabled=True, open_reads=False) as client:

        def status(method: str, path: str, key: str | None = None, **kwargs: object) -> int:
            headers = {"X-API-Key": key} if key else {}
            return client.request(method, path, headers=headers, **kwargs).status_code

        query = jpeg_bytes(class_image("blue", seed=9))
        # Health, readiness and metrics stay open for probes and Prometheus.
        assert [status("GET", p) for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
        assert status("GET", "/v1/images") == 401
        assert status("GET", "/v1/images", "rk_not-a-key") == 401
        assert status("GET", "/v1/images", reader) == 200
        assert status("GET", "/v1/images", writer) == 403
        assert upload(client, query, headers={"X-API-Key": reader}).status_code == 200
        assert upload(client, query).status_code == 401
        assert upload(client, query, path="/v1/images", headers={"X-API-Key": reader}).status_code == 403
        created = upload(client, query, path="/v1/images", headers={"X-API-Key": both})
        assert created.status_code == 201
        image_id = created.json()["id"]
        assert status("PATCH", f"/v1/images/{image_id}", reader, json={"label": "x"}) == 403
        assert status("PATCH", f"/v1/images/{image_id}", writer, json={"label": "x"}) == 200
        assert status("DELETE", f"/v1/images/{image_id}", reader) == 403
        assert status("GET", "/v1/models", reader) == 200 and status("GET", "/v1/models") == 401
        # Revocation takes effect (the key cache is off in tests).
        assert revoke_api_key(url, both_id)
        assert status("GET", "/v1/images", both) == 401
        assert status("DELETE", f"/v1/images/{image_id}", writer) == 204


def test_tiny_embedder_helper_is_deterministic(tmp_path: Path) -> None:
    from models.checkpoint import load_checkpoint

    a = load_checkpoint(save_tiny_embedder(tmp_path / "a", seed=1))
    b = load_checkpoint(save_tiny_embedder(tmp_path / "b", seed=1))
    pixels = torch.rand(1, 3, 64, 64)
    assert torch.allclose(a(pixels), b(pixels))
