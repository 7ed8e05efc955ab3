"""Query by image: by upload (POST /v1/search) and by a stored image (GET /v1/images/{id}/similar); why a result
matched (GET /v1/images/{id}/explain, and explain=true on a search; app/explain.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    K_DOC,
    LABEL_DOC,
    META_FILTER_DOC,
    MIN_SCORE_DOC,
    SessionDep,
    check_k,
    filters_dep,
    get_batcher,
    get_deployment,
)
from app.auth import require_read
from app.db.models import Image
from app.errors import ApiError
from app.explain import decode_for_explain, explain_pair, explain_results, forward_local, read_stored
from app.schemas import ErrorBody, ExplainResponse, SearchResponse
from app.serving import (
    Filters,
    StageClock,
    decode_query,
    embed_pixels,
    parse_meta_filters,
    read_stored_query,
    search_and_join,
)

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_read)])

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 503)}
EXPLAIN_DOC = ("Also return heatmaps of why each result matched (the `explain` object; costs one torch forward "
               "pass over the results shown).")


@router.post("/search", response_model=SearchResponse, responses=ERRORS)
async def search(
    request: Request,
    session: SessionDep,
    file: UploadFile = File(..., description="The query image (JPEG, PNG, GIF, WebP, BMP, TIFF)."),
    k: int = Form(10, ge=1, description=K_DOC),
    label: str | None = Form(None, max_length=255, description=LABEL_DOC),
    meta: list[str] = Form([], description=META_FILTER_DOC),
    min_score: float | None = Form(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC),
    explain: bool = Form(False, description=EXPLAIN_DOC),
) -> SearchResponse:
    """The k stored images most similar to the uploaded one (with explain=true, and heatmaps of why)."""
    settings = request.app.state.settings
    check_k(request, k, "body")
    deployment = get_deployment(request)
    filters = Filters(label=label, meta=parse_meta_filters(meta))
    clock = StageClock()
    data = await file.read()
    image, pixels = await run_in_threadpool(decode_query, deployment, data, settings, clock)
    if explain:  # one torch pass gives the search vector and the query's feature map
        t = time.perf_counter()
        query_features = await run_in_threadpool(forward_local, deployment, pixels[None])
        clock.ms["forward"] = (time.perf_counter() - t) * 1000
        vector = query_features.embedding[0].numpy()
    else:
        vector = await embed_pixels(get_batcher(request), deployment, pixels, clock)
    results = await search_and_join(session, deployment, vector, k, filters, min_score, clock)
    explanation = None
    if explain:
        def explain_hits() -> object:
            stored = [(hit.id, read_stored(deployment, hit.uri, settings)) for hit in results]
            return explain_results(deployment, decode_for_explain(deployment, image, pixels), query_features, stored)

        explanation = await run_in_threadpool(explain_hits)
    return SearchResponse(results=results, model_version=deployment.model_name,
                          index_version=deployment.index_name, timings=clock.timings(), explain=explanation)


def _stored_uri(session: Session, image_id: int) -> str:
    row = session.get(Image, image_id)
    if row is None or row.deleted_at is not None:
        raise ApiError(404, f"image {image_id} does not exist")
    uri = row.uri
    session.commit()  # hands the connection back to the pool while the query is embedded
    return uri


@router.get("/images/{image_id}/explain", response_model=ExplainResponse, responses=ERRORS)
async def explain_match(
    request: Request,
    session: SessionDep,
    image_id: int = Path(ge=1, le=2**62, description="The result: the stored image to explain the match of."),
    query_id: int = Query(ge=1, le=2**62, description="The query: another stored image."),
) -> ExplainResponse:
    """Heatmaps over both images of which regions drive their similarity (and ABE/OSME attention masks)."""
    settings = request.app.state.settings
    deployment = get_deployment(request)
    uris = {}
    for wanted in (query_id, image_id):
        uris[wanted] = await run_in_threadpool(_stored_uri, session, wanted)
    decoded = {}
    for wanted, uri in uris.items():
        decoded[wanted] = await run_in_threadpool(read_stored, deployment, uri, settings)
        if decoded[wanted] is None:
            raise ApiError(404, f"the file of image {wanted} is gone")
    return await run_in_threadpool(explain_pair, deployment, query_id, decoded[query_id], image_id,
                                   decoded[image_id])


@router.get("/images/{image_id}/similar", response_model=SearchResponse, responses=ERRORS)
async def similar(
    request: Request,
    session: SessionDep,
    image_id: int = Path(ge=1, le=2**62),
    k: int = Query(10, ge=1, description=K_DOC),
    min_score: float | None = Query(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC),
    filters: Filters = Depends(filters_dep),
) -> SearchResponse:
    """The k stored images most similar to stored image `image_id` (itself excluded)."""
    settings = request.app.state.settings
    check_k(request, k, "query")
    deployment = get_deployment(request)
    clock = StageClock()
    t = time.perf_counter()
    uri = await run_in_threadpool(_stored_uri, session, image_id)
    t = clock.record("metadata", t)
    vector = await run_in_threadpool(deployment.reconstruct, image_id)
    if vector is None:  # not in this index type's storage (IVF-PQ) or not indexed: embed its file
        try:
            pixels = await run_in_threadpool(read_stored_query, deployment, uri, settings, clock)
        except OSError:
            raise ApiError(404, f"the file of image {image_id} is gone") from None
        vector = await embed_pixels(get_batcher(request), deployment, pixels, clock)
    results = await search_and_join(session, deployment, vector, k, filters, min_score, clock, exclude=[image_id])
    return SearchResponse(results=results, model_version=deployment.model_name,
                          index_version=deployment.index_name, timings=clock.timings())
