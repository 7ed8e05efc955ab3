"""POST /v1/search: query by image upload."""

from __future__ import annotations

import time

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import get_deployment, hits_for
from app.images import decode_image
from app.schemas import ErrorBody, SearchResponse, Timings

router = APIRouter(prefix="/v1", tags=["search"])

ERRORS = {code: {"model": ErrorBody} for code in (400, 413, 415, 422, 503)}


@router.post("/search", response_model=SearchResponse, responses=ERRORS)
async def search(
    request: Request,
    file: UploadFile = File(..., description="The query image (JPEG, PNG, GIF, WebP, BMP, TIFF)."),
    k: int = Form(10, ge=1, le=100, description="How many neighbours to return."),
) -> SearchResponse:
    settings = request.app.state.settings
    deployment = get_deployment(request)
    started = time.perf_counter()
    data = await file.read()
    image = await run_in_threadpool(decode_image, data, settings.max_upload_bytes, settings.max_image_pixels)
    decoded = time.perf_counter()
    vectors = await run_in_threadpool(deployment.embed, [image])
    embedded = time.perf_counter()
    scores, ids = await run_in_threadpool(deployment.index.search, vectors, k)
    searched = time.perf_counter()
    results = await run_in_threadpool(hits_for, settings, scores[0], ids[0])
    joined = time.perf_counter()
    ms = lambda a, b: round((b - a) * 1000, 2)  # noqa: E731
    return SearchResponse(
        results=results,
        model_version=deployment.model_name,
        index_version=deployment.index_name,
        timings=Timings(decode_ms=ms(started, decoded), embed_ms=ms(decoded, embedded),
                        search_ms=ms(embedded, searched), metadata_ms=ms(searched, joined),
                        total_ms=ms(started, joined)),
    )
