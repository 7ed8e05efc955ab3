"""Near-duplicate groups: GET /v1/duplicates (app/duplicates.py does the work)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, get_deployment
from app.api.search import ERRORS
from app.auth import require_read
from app.deployment import Deployment
from app.duplicates import find_groups, keeper_first
from app.schemas import DuplicateGroup, DuplicatePage, DuplicatePair, ImageOut

router = APIRouter(prefix="/v1", tags=["duplicates"], dependencies=[Depends(require_read)])

THRESHOLD_DOC = ("Cosine similarity at or above which two images count as near-duplicates (-1..1); default "
                 "RETRIEVAL_NEAR_DUPLICATE_THRESHOLD (chosen on real photos with made copies: docs/api.md).")


def _page(session: Session, deployment: Deployment, threshold: float, limit: int, cursor: int | None) -> DuplicatePage:
    groups, next_cursor = find_groups(session, deployment, threshold, limit, cursor)
    out = []
    for group in groups:
        rows = keeper_first(session, group.ids)
        live = [r for r in rows if r.deleted_at is None]
        if len(live) < 2:
            continue  # deleted while we searched
        live_ids = {r.id for r in live}
        out.append(DuplicateGroup(
            keeper_id=live[0].id, images=[ImageOut.model_validate(r) for r in live],
            pairs=[DuplicatePair(a=a, b=b, score=s) for a, b, s in group.pairs if a in live_ids and b in live_ids]))
    return DuplicatePage(groups=out, threshold=threshold, next_cursor=next_cursor)


@router.get("/duplicates", response_model=DuplicatePage, responses=ERRORS)
async def duplicates(
    request: Request,
    session: SessionDep,
    # Optional bounded parameters in Annotated form: the bounds sit on the parameter, not on a `Query(None)`
    # default (which newer pydantic flags with UnsupportedFieldAttributeWarning).
    threshold: Annotated[float | None, Query(ge=-1.0, le=1.0, description=THRESHOLD_DOC)] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Groups per page.")] = 20,
    cursor: Annotated[int | None, Query(ge=0, le=2**62, description="`next_cursor` of the previous page.")] = None,
) -> DuplicatePage:
    """Groups of near-identical stored images (resized, re-encoded, lightly cropped copies), each with a
    suggested keeper (largest resolution, then oldest) and its pairwise scores; found by FAISS range searches,
    paged by the groups' smallest ids."""
    deployment = get_deployment(request)
    if threshold is None:
        threshold = request.app.state.settings.near_duplicate_threshold
    return await run_in_threadpool(_page, session, deployment, threshold, limit, cursor)
