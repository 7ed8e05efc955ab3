"""create_app(): the FastAPI application. The lifespan loads the active model + index pair once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.api import health, images, jobs, search
from app.deployment import load_active
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Multipart framing around the image: boundaries, headers and the small form fields.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.deployment = None
        app.state.load_error = None
        try:
            app.state.deployment = await run_in_threadpool(load_active, settings)
        except Exception as exc:  # noqa: BLE001 - serve /healthz and report in /readyz instead of dying
            log.exception("could not load the active model and index")
            app.state.load_error = f"loading the active version failed: {exc}"
        if app.state.deployment is not None:
            d = app.state.deployment
            log.info("serving model %s with index %s (%d vectors) on %s", d.model_name, d.index_name,
                     len(d.index), d.device)
        yield

    app = FastAPI(
        title="Image retrieval",
        version="0.1.0",
        description="Query-by-image search over a FAISS index with a SQL metadata store.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.include_router(health.router)
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(jobs.router)
    return app
