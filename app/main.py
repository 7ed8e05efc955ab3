"""create_app(): the FastAPI application.

The lifespan loads the active model + index pair, starts the micro-batcher and the task that hot-swaps in a
newly promoted version. Static files (the query page) are served by the app itself: no build step, no CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser
from swagger_ui_bundle import swagger_ui_path

from app import metrics
from app.api import duplicates, health, images, jobs, recommend, search, versions
from app.batching import AdmissionGate, MicroBatcher, default_max_batch_size
from app.compaction import maintain
from app.deployment import NO_ACTIVE_INDEX, ServingState, fit_batch_cap, load_active
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.settings import Settings, get_settings
from models.embedder import DeviceUnavailable, resolve_device

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_UI = "/swagger-ui"
# Multipart framing around the image: boundaries, headers and the small form fields.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.deployment = None
        metrics.forget_dead_workers()
        serving: ServingState = app.state.serving
        try:
            app.state.deployment = await run_in_threadpool(load_active, settings, serving)
        except Exception as exc:  # serve /healthz and report in /readyz instead of dying
            # A database not set up yet (or not answering) is one line saying what to do, not a traceback.
            if not serving.database_failed(exc, app.state.database_url, serving=False):
                log.exception("could not load the active model and index")
                serving.load_error = f"loading the active version failed: {exc}"
        if app.state.deployment is None and serving.load_error is None:
            serving.load_error = NO_ACTIVE_INDEX
        if app.state.deployment is not None:
            d = app.state.deployment
            fit_batch_cap(app, settings, d)
            metrics.INDEX_VECTORS.set(len(d.index))
            app.state.serving.reset_pending(sum(d.reconciled.values()))
            log.info("serving model %s with index %s (%d vectors) on %s, runtime %s %s", d.model_name,
                     d.index_name, len(d.index), d.device, d.runner.info.runtime, d.runner.info.precision)
        # Everything loaded so far (torch, the model, the libraries) lives as long as the process: out of the
        # collector's sight, full collections stop walking it under load (they showed in the service's profile).
        gc.collect()
        gc.freeze()
        await app.state.batcher.start()
        watcher = asyncio.create_task(maintain(app, settings), name="hot-swap+compaction")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await app.state.batcher.stop()
            gc.unfreeze()  # this app's objects become collectable again (a test process starts many apps)

    app = FastAPI(
        title="Image retrieval",
        version="0.1.0",
        description="Query-by-image search over a FAISS index with a SQL metadata store. Every error is JSON: "
                    '`{"error": code, "message": text, "detail": ...}`.',
        lifespan=lifespan,
        docs_url=None,  # served below from local files
    )
    app.state.settings = settings
    app.state.database_url = settings.resolved_database_url  # resolved once (a path resolve per request showed)
    app.state.serving = ServingState()
    app.state.deployment = None
    try:
        device_type = resolve_device(settings.device).type
    except DeviceUnavailable:  # loading the model reports it in /readyz
        device_type = "cpu"
    batch_cap = settings.max_batch_size or default_max_batch_size(device_type)
    app.state.batcher = MicroBatcher(batch_cap, settings.max_batch_wait_ms, settings.max_queue)
    # Heatmaps bypass the batcher (torch passes of their own): the same overload answer, with a limit of their own.
    app.state.explain_gate = AdmissionGate(settings.explain_max_concurrent, settings.explain_max_queue,
                                           "explain requests")
    install_error_handlers(app)
    body_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
    app.add_middleware(BodySizeLimit, max_bytes=body_limit, image_bytes=settings.max_upload_bytes)
    # Uploads stay in memory up to the body limit (the route reads them whole anyway). Past Starlette's 1 MB spool
    # every 64 KB chunk of a phone photo went to a temporary file through a threadpool hop, and back.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, body_limit)
    app.add_middleware(metrics.RequestMetrics)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(search.router)
    app.include_router(recommend.router)
    app.include_router(duplicates.router)
    app.include_router(images.router)
    app.include_router(jobs.router)
    app.include_router(versions.router)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Swagger UI from the files a package ships, not from a CDN: deployments are often offline.
    app.mount(SWAGGER_UI, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js", swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png",
            # no badge from the public validator service, the one other host the page would reach
            swagger_ui_parameters={"validatorUrl": None},
        )

    return app
