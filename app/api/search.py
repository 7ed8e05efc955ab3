"""Query by image: by upload (POST /v1/search) and by a stored image (GET /v1/images/{id}/similar)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    LABEL_DOC,
    META_FILTER_DOC,
    MIN_SCORE_DOC,
    Filters,
    StageClock,
    embed_query,
    filters_dep,
    get_deployment,
    parse_meta_filters,
    search_and_join,
)
from app.auth import require_read
from app.db.models import Image
from app.db.session import session_scope
from app.errors import ApiError
from app.images import decode_image, read_image_file
from app.schemas import ErrorBody, SearchResponse, Timings

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_read)])

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 503)}


def _timings(clock: StageClock) -> Timings:
    ms = {k: round(v, 2) for k, v in clock.ms.items()}
    return Timings(decode_ms=ms.get("decode", 0.0), preprocess_ms=ms.get("preprocess", 0.0),
                   forward_ms=ms.get("forward", 0.0),
                   embed_ms=round(ms.get("preprocess", 0.0) + ms.get("forward", 0.0), 2),
                   search_ms=ms.get("search", 0.0), metadata_ms=ms.get("metadata", 0.0),
                   total_ms=round(clock.total(), 2))


@router.post("/search", response_model=SearchResponse, responses=ERRORS)
async def search(
    request: Request,
    file: UploadFile = File(..., description="The query image (JPEG, PNG, GIF, WebP, BMP, TIFF)."),
    k: int = Form(10, ge=1, le=100, description="How many neighbours to return."),
    label: str | None = Form(None, max_length=255, description=LABEL_DOC),
    meta: list[str] = Form([], description=META_FILTER_DOC),
    min_score: float | None = Form(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC),
) -> SearchResponse:
    """The k stored images most similar to the uploaded one."""
    settings = request.app.state.settings
    deployment = get_deployment(request)
    filters = Filters(label=label, meta=parse_meta_filters(meta))
    clock = StageClock()
    data = await file.read()
    t = time.perf_counter()
    image = await run_in_threadpool(decode_image, data, settings.max_upload_bytes, settings.max_image_pixels)
    clock.record("decode", t)
    vector = await embed_query(request, deployment, image, clock)
    results = await search_and_join(settings, deployment, vector, k, filters, min_score, clock)
    return SearchResponse(results=results, model_version=deployment.model_name,
                          index_version=deployment.index_name, timings=_timings(clock))


def _stored_uri(settings, image_id: int) -> str:  # noqa: ANN001
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Image, image_id)
        if row is None or row.deleted_at is not None:
            raise ApiError(404, f"image {image_id} does not exist")
        return row.uri


@router.get("/images/{image_id}/similar", response_model=SearchResponse, responses=ERRORS)
async def similar(
    request: Request,
    image_id: int = Path(ge=1, le=2**62),
    k: int = Query(10, ge=1, le=100, description="How many neighbours to return."),
    min_score: float | None = Query(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC),
    filters: Filters = Depends(filters_dep),
) -> SearchResponse:
    """The k stored images most similar to stored image `image_id` (itself excluded)."""
    settings = request.app.state.settings
    deployment = get_deployment(request)
    clock = StageClock()
    t = time.perf_counter()
    uri = await run_in_threadpool(_stored_uri, settings, image_id)
    t = clock.record("metadata", t)
    vector = await run_in_threadpool(deployment.reconstruct, image_id)
    if vector is None:  # not in this index type's storage (IVF-PQ) or not indexed: embed its file
        try:
            image = await run_in_threadpool(read_image_file, uri, settings.max_upload_bytes,
                                            settings.max_image_pixels)
        except OSError:
            raise ApiError(404, f"the file of image {image_id} is gone") from None
        clock.record("decode", t)
        vector = await embed_query(request, deployment, image, clock)
    results = await search_and_join(settings, deployment, vector, k, filters, min_score, clock, exclude=[image_id])
    return SearchResponse(results=results, model_version=deployment.model_name,
                          index_version=deployment.index_name, timings=_timings(clock))
