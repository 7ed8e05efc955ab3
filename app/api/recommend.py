"""Relevance feedback: POST /v1/search/recommend, "more like these, less like those".

Strategy (Rocchio, app/ranking.py): the query is the mean of the positive examples' vectors minus half the mean
of the negatives', normalised; the examples themselves never come back. Examples are stored ids and/or
uploaded images.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from sqlalchemy import select
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
    form_fields_in_the_body,
    get_batcher,
    get_deployment,
    ranking_form,
)
from app.api.search import ERRORS, search_response, stored_vector
from app.auth import require_read
from app.db.models import Image
from app.errors import ApiError
from app.ranking import Ranking, rocchio
from app.schemas import SearchResponse, no_label_if_empty
from app.serving import Filters, StageClock, decode_query, embed_pixels, parse_meta_filters, search_and_join

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_read)])

MAX_EXAMPLES = 50


def _check_examples(session: Session, positive: list[int], negative: list[int]) -> None:
    """Every example id is a live image, or a 422 naming the field and the unknown ids."""
    asked = set(positive) | set(negative)
    live = set(session.scalars(select(Image.id).where(Image.id.in_(asked), Image.deleted_at.is_(None))))
    errors = [{"loc": ["body", field], "msg": f"unknown image ids: {sorted(set(ids) - live)}"}
              for field, ids in (("positive", positive), ("negative", negative)) if set(ids) - live]
    session.commit()  # hands the connection back while the examples are embedded
    if errors:
        raise ApiError(422, "; ".join(f"{e['loc'][1]}: {e['msg']}" for e in errors), detail=errors)


@router.post("/search/recommend", response_model=SearchResponse, responses=ERRORS,
             # feedback by stored ids alone needs no upload, so a urlencoded form (-d positive=42) is enough
             dependencies=[Depends(multipart_body("-F positive_file=@photo.jpg -F k=10", urlencoded_too=True)),
                           Depends(form_fields_in_the_body)])
async def recommend(
    request: Request,
    session: SessionDep,
    positive: list[int] = Form([], description="Stored image ids to move towards (repeat the field)."),
    negative: list[int] = Form([], description="Stored image ids to move away from (repeat the field)."),
    positive_file: list[UploadFile] = File([], description="Uploaded images to move towards."),
    negative_file: list[UploadFile] = File([], description="Uploaded images to move away from."),
    k: int | None = Form(None, ge=1, description=K_DOC),
    label: str | None = Form(None, max_length=255, description=LABEL_DOC),
    meta: list[str] = Form([], description=META_FILTER_DOC),
    min_score: float | None = Form(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC),
    ranking: Ranking = Depends(ranking_form),
) -> SearchResponse:
    """The k stored images closest to the positive examples and away from the negative ones (Rocchio: mean of
    positives minus half the mean of negatives). At least one positive (id or file); the example ids never come
    back as results."""
    settings = request.app.state.settings
    k = check_k(request, k, "body", ranking.offset)
    if not positive and not positive_file:
        raise ApiError(422, "positive: give at least one positive example (a stored id or a positive_file)",
                       detail=[{"loc": ["body", "positive"], "msg": "at least one positive example"}])
    if len(positive) + len(negative) + len(positive_file) + len(negative_file) > MAX_EXAMPLES:
        raise ApiError(422, f"positive: at most {MAX_EXAMPLES} examples in all",
                       detail=[{"loc": ["body", "positive"], "msg": f"at most {MAX_EXAMPLES} examples"}])
    ids = [i for i in positive + negative if not 1 <= i <= 2**62]
    if ids:
        raise ApiError(422, f"positive/negative: ids must be between 1 and 2^62, got {ids[:5]}",
                       detail=[{"loc": ["body", "positive"], "msg": "id out of range"}])
    filters = Filters(label=no_label_if_empty(label), meta=parse_meta_filters(meta))
    deployment = get_deployment(request)
    await run_in_threadpool(_check_examples, session, positive, negative)
    clock = StageClock()

    async def vectors(stored: list[int], files: list[UploadFile]) -> list[np.ndarray]:
        out = [await stored_vector(request, session, deployment, image_id, clock) for image_id in dict.fromkeys(stored)]
        for upload in files:
            _, pixels = await run_in_threadpool(decode_query, deployment, await upload.read(), settings, clock)
            out.append(await embed_pixels(get_batcher(request), deployment, pixels, clock))
        return out

    plus = np.stack(await vectors(positive, positive_file))
    minus = await vectors(negative, negative_file)
    query = rocchio(plus, np.stack(minus) if minus else np.zeros((0, plus.shape[1]), np.float32))
    results = await search_and_join(session, deployment, query, k, filters, min_score, clock,
                                    exclude=sorted(set(positive) | set(negative)), ranking=ranking)
    return search_response(request, deployment, results, k, ranking, clock)
