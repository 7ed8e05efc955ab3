"""Helpers shared by the API, page and property-based tests (no tests here): a tiny embedder checkpoint, a
built corpus, the app in-process (routes and error bodies) and a real uvicorn server serving it (where the server
process is the point: kill -9, concurrency under real HTTP, the page in Chromium)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from tests.conftest import CLASS_COLOURS, make_settings, settings_env
from tests.live_server import LiveServer
from tests.test_indexing import make_corpus

if TYPE_CHECKING:
    import pytest
    from fastapi.testclient import TestClient

    from app.settings import Settings

# A small random-init timm embedder: a forward pass costs milliseconds on CPU, so many server tests stay cheap.
TINY_DIM = 64
# What the tests' servers and apps run with: a quick hot-swap poll, and no API-key cache (revocation at once).
TEST_SERVING = {"swap_poll_s": 0.3, "auth_cache_s": 0}


def save_tiny_embedder(path: Path, dim: int = TINY_DIM, seed: int = 0) -> Path:
    import torch

    from models.checkpoint import save_checkpoint
    from models.embedder import EmbedderConfig, TimmEmbedder

    torch.manual_seed(seed)
    config = EmbedderConfig(arch="timm", backbone="resnet10t", dim=dim, image_size=64, resize_size=64,
                            pretrained="none")
    save_checkpoint(TimmEmbedder(config), path)
    return path


def build_served_corpus(tmp: Path, database_url: str, per_class: int = 5, **overrides: object) -> Settings:
    """Settings over a fresh data dir whose active index holds the corpus, embedded by the tiny embedder."""
    from app.indexing import build_index

    embedder = save_tiny_embedder(tmp / "tiny-embedder")
    settings = make_settings(tmp / "data", database_url, embedder=str(embedder), **TEST_SERVING, **overrides)
    report = build_index(settings, make_corpus(tmp / "corpus", per_class), progress=False)
    assert report.total_indexed == per_class * len(CLASS_COLOURS), report.summary()
    return settings


@contextmanager
def app_client(settings: Settings, **overrides: object) -> Iterator[TestClient]:
    """The app in this process, driven through an httpx-style client without a socket. Entering runs its
    lifespan as uvicorn would (load the active pair, start the micro-batcher and the hot-swap watcher); leaving
    shuts it down. Server errors come back as 500 responses, as they would over HTTP."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(settings.model_copy(update={**TEST_SERVING, **overrides}))
    with TestClient(app, raise_server_exceptions=False, base_url="http://testserver") as client:
        yield client


def client_on_each_db(request: pytest.FixtureRequest, sqlite_client: TestClient,
                      settings_on: Callable[[str], Settings]) -> Iterator[TestClient]:
    """For a fixture parametrized over DATABASES: the module's SQLite client as it is, or an app of its own over
    `settings_on(kind)` (the same corpus on that database)."""
    if request.param == "sqlite":
        yield sqlite_client
    else:
        with app_client(settings_on(request.param)) as client:
            yield client


def server_env(settings: Settings, **env: object) -> dict[str, str]:
    values = settings_env(settings) | {f"RETRIEVAL_{k.upper()}": str(v) for k, v in TEST_SERVING.items()}
    values.update({f"RETRIEVAL_{k.upper()}": str(v) for k, v in env.items()})
    return values


def start_server(settings: Settings, log: Path, **env: object) -> LiveServer:
    return LiveServer(server_env(settings, **env), log).start()


def upload(target: str | TestClient, data: bytes, path: str = "/v1/search", headers: dict | None = None,
           filename: str = "query.jpg", **form: object) -> httpx.Response:
    """A multipart upload to a live server's base URL, or to the in-process app through its client."""
    fields = {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in form.items()}
    kwargs = {"files": {"file": (filename, data, "image/jpeg")}, "data": fields, "headers": headers or {}}
    if isinstance(target, str):
        return httpx.post(f"{target}{path}", timeout=60, **kwargs)
    return target.post(path, **kwargs)
