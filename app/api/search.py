"""Query by image: by upload (POST /v1/search, optionally a region of it) and by a stored image
(GET /v1/images/{id}/similar), both with the ranking options of app/ranking.py (offset, effort, diversity); why
a result matched (GET /v1/images/{id}/explain, and explain=true on a search; app/explain.py)."""

from __future__ import annotations

import contextlib
import time

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.content_type import multipart_body
from app.api.deps import (
    K_DOC,
    LABEL_DOC,
    META_FILTER_DOC,
    MIN_SCORE_DOC,
    SessionDep,
    check_k,
    explain_gate,
    filters_dep,
    form_fields_in_the_body,
    get_batcher,
    get_deployment,
    ranking_form,
    ranking_query,
)
from app.auth import require_read
from app.db.models import Image
from app.deployment import Deployment
from app.errors import ApiError
from app.explain import decode_for_explain, explain_pair, explain_results, forward_local, read_stored
from app.images import FORMATS_READ
from app.ranking import Ranking
from app.region import BOX_DOC, parse_box
from app.schemas import ErrorBody, ExplainResponse, SearchHit, SearchResponse, no_label_if_empty
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


@router.post("/search", response_model=SearchResponse, responses=ERRORS,
             dependencies=[Depends(multipart_body("-F file=@photo.jpg -F k=10")), Depends(form_fields_in_the_body)])
async def search(
    request: Request,
    session: SessionDep,
    file: UploadFile = File(..., description=f"The query image ({FORMATS_READ})."),
    k: int | None = Form(None, ge=1, description=K_DOC),
    label: str | None = Form(None, max_length=255, description=LABEL_DOC),
    meta: list[str] = Form([], description=META_FILTER_DOC),
    min_score: float | None = Form(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC),
    box: str | None = Form(None, max_length=200, description=BOX_DOC),
    explain: bool = Form(False, description=EXPLAIN_DOC),
    ranking: Ranking = Depends(ranking_form),
) -> SearchResponse:
    """The k stored images most similar to the uploaded one (or to the `box` region of it); with explain=true,
    heatmaps of why."""
    settings = request.app.state.settings
    k = check_k(request, k, "body", ranking.offset)
    region = parse_box(box)
    deployment = get_deployment(request)
    filters = Filters(label=no_label_if_empty(label), meta=parse_meta_filters(meta))
    # An explain=true search is admitted like a batched query is (503 JSON when too many are in flight).
    async with explain_gate(request).admit() if explain else contextlib.nullcontext():
        clock = StageClock()
        data = await file.read()
        image, pixels = await run_in_threadpool(decode_query, deployment, data, settings, clock, region)
        if explain:  # one torch pass gives the search vector and the query's feature map
            t = time.perf_counter()
            query_features = await run_in_threadpool(forward_local, deployment, pixels[None])
            clock.ms["forward"] = (time.perf_counter() - t) * 1000
            vector = query_features.embedding[0].numpy()
            if deployment.runner.config.flip_average:  # the maps' pass skips the mirror; the search vector may not
                vector = await embed_pixels(get_batcher(request), deployment, pixels, clock)
        else:
            vector = await embed_pixels(get_batcher(request), deployment, pixels, clock)
        results = await search_and_join(session, deployment, vector, k, filters, min_score, clock, ranking=ranking)
        response = search_response(request, deployment, results, k, ranking, clock)
        if explain:
            def explain_hits() -> object:
                stored = [(hit.id, read_stored(deployment, hit.uri, settings)) for hit in results]
                query = decode_for_explain(deployment, image, pixels)
                return explain_results(deployment, query, query_features, stored)

            response.explain = await run_in_threadpool(explain_hits)
        return response


def search_response(request: Request, deployment: Deployment, results: list[SearchHit], k: int, ranking: Ranking,
                    clock: StageClock) -> SearchResponse:
    """The response of every search route: the page and, when it is full and RETRIEVAL_MAX_K allows a deeper one,
    the `next_offset` that asks for the next page."""
    deeper = ranking.offset + k
    full = len(results) == k and deeper < request.app.state.settings.max_k
    return SearchResponse(results=results, model_version=deployment.model_name, index_version=deployment.index_name,
                          timings=clock.timings(), next_offset=deeper if full else None)


def _stored_uri(session: Session, image_id: int) -> str:
    row = session.get(Image, image_id)
    if row is None or row.deleted_at is not None:
        raise ApiError(404, f"image {image_id} does not exist")
    uri = row.uri
    session.commit()  # hands the connection back to the pool while the query is embedded
    return uri


async def stored_vector(request: Request, session: Session, deployment: Deployment, image_id: int,
                        clock: StageClock) -> np.ndarray:
    """The vector of a live stored image: from the index (or this model's stored embeddings), else its file
    embedded as an upload of the same bytes would be. 404 when it is not a live image."""
    settings = request.app.state.settings
    t = time.perf_counter()
    uri = await run_in_threadpool(_stored_uri, session, image_id)
    clock.record("metadata", t)
    ids, vectors = await run_in_threadpool(deployment.vectors, np.array([image_id], dtype=np.int64))
    if len(ids):
        return vectors[0]
    try:
        pixels = await run_in_threadpool(read_stored_query, deployment, uri, settings, clock)
    except OSError:
        raise ApiError(404, f"the file of image {image_id} is gone") from None
    return await embed_pixels(get_batcher(request), deployment, pixels, clock)


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
    async with explain_gate(request).admit():
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
    k: int | None = Query(None, ge=1, description=K_DOC),
    min_score: float | None = Query(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC),
    filters: Filters = Depends(filters_dep),
    ranking: Ranking = Depends(ranking_query),
) -> SearchResponse:
    """The k stored images most similar to stored image `image_id` (itself excluded): "more like this"."""
    k = check_k(request, k, "query", ranking.offset)
    deployment = get_deployment(request)
    clock = StageClock()
    vector = await stored_vector(request, session, deployment, image_id, clock)
    results = await search_and_join(session, deployment, vector, k, filters, min_score, clock, exclude=[image_id],
                                    ranking=ranking)
    return search_response(request, deployment, results, k, ranking, clock)
