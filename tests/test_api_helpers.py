"""Helpers shared by the API, page and property-based tests (no tests here): a tiny embedder checkpoint, a
built corpus, and a real uvicorn server serving it."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import CLASS_COLOURS, make_settings, settings_env
from tests.live_server import LiveServer
from tests.test_indexing import make_corpus

# A small random-init timm embedder: a forward pass costs milliseconds on CPU, so many server tests stay cheap.
TINY_DIM = 64


def save_tiny_embedder(path: Path, dim: int = TINY_DIM, seed: int = 0) -> Path:
    import torch

    from models.checkpoint import save_checkpoint
    from models.embedder import EmbedderConfig, TimmEmbedder

    torch.manual_seed(seed)
    config = EmbedderConfig(arch="timm", backbone="resnet10t", dim=dim, image_size=64, resize_size=64,
                            pretrained="none")
    save_checkpoint(TimmEmbedder(config), path)
    return path


def build_served_corpus(tmp: Path, database_url: str, per_class: int = 5, **overrides):  # noqa: ANN201
    """Settings over a fresh data dir whose active index holds the corpus, embedded by the tiny embedder."""
    from app.indexing import build_index

    embedder = save_tiny_embedder(tmp / "tiny-embedder")
    settings = make_settings(tmp / "data", database_url, embedder=str(embedder), **overrides)
    report = build_index(settings, make_corpus(tmp / "corpus", per_class), progress=False)
    assert report.total_indexed == per_class * len(CLASS_COLOURS), report.summary()
    return settings


def server_env(settings, **env: object) -> dict[str, str]:  # noqa: ANN001
    values = settings_env(settings) | {"RETRIEVAL_SWAP_POLL_S": "0.3", "RETRIEVAL_AUTH_CACHE_S": "0"}
    values.update({f"RETRIEVAL_{k.upper()}": str(v) for k, v in env.items()})
    return values


def start_server(settings, log: Path, **env: object) -> LiveServer:  # noqa: ANN001
    return LiveServer(server_env(settings, **env), log).start()


def upload(base: str, data: bytes, path: str = "/v1/search", headers: dict | None = None,
           filename: str = "query.jpg", **form: object) -> httpx.Response:
    fields = {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in form.items()}
    return httpx.post(f"{base}{path}", files={"file": (filename, data, "image/jpeg")}, data=fields,
                      headers=headers or {}, timeout=60)
