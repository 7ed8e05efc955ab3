"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db.session import get_engine
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and a model + index pair is loaded."""
    state = request.app.state
    detail: dict = {}
    ready = True
    try:
        with get_engine(state.settings.resolved_database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        detail["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        ready = False
        detail["database"] = f"unreachable: {exc.__class__.__name__}"
    deployment = getattr(state, "deployment", None)
    if deployment is None:
        ready = False
        detail["index"] = getattr(state, "load_error", None) or "no active index; run `retrieval index build SOURCE`"
    else:
        detail.update(model_version=deployment.model_name, index_version=deployment.index_name,
                      vectors=len(deployment.index), device=str(deployment.device))
    body = Health(status="ready" if ready else "not_ready", detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
