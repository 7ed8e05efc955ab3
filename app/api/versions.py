"""Model versions and index versions, with their metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from app.api.deps import SessionDep
from app.auth import require_read
from app.db.models import IndexVersion, ModelVersion
from app.schemas import ErrorBody, IndexVersionList, IndexVersionOut, ModelVersionList, ModelVersionOut

router = APIRouter(prefix="/v1", tags=["versions"], dependencies=[Depends(require_read)])
ERRORS = {code: {"model": ErrorBody} for code in (401, 403)}


@router.get("/models", response_model=ModelVersionList, responses=ERRORS)
def list_models(request: Request, session: SessionDep) -> ModelVersionList:
    """Every model version, newest first, with its evaluation metrics and status (candidate/active/retired); the
    one this process serves also says how (`serving`: runtime, precision, device, parity)."""
    rows = session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all()
    deployment = request.app.state.deployment
    items = [ModelVersionOut.model_validate(r) for r in rows]
    for item in items:
        if deployment is not None and item.name == deployment.model_name:
            item.serving = deployment.runner.info.as_dict()
    return ModelVersionList(items=items)


@router.get("/indexes", response_model=IndexVersionList, responses=ERRORS)
def list_indexes(session: SessionDep) -> IndexVersionList:
    """Every index version, newest first, with its factory, size, search params and build metrics."""
    rows = session.scalars(select(IndexVersion).order_by(IndexVersion.id.desc())).all()
    return IndexVersionList(items=[IndexVersionOut.model_validate(r) for r in rows])
