"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.db.session import database_problem, schema_behind
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


def _database_ok(url: str) -> str:
    """"ok" when the database answers at this code's migration revision; else what is wrong: the line
    `retrieval db upgrade` fixes, or "unreachable: ..."."""
    try:
        behind = schema_behind(url)
    except Exception as exc:  # any failure means not ready
        found = database_problem(exc, url)
        if found is not None and found[1]:
            return f"{found[0]}: run `retrieval db upgrade`"
        return f"unreachable: {found[0] if found else exc.__class__.__name__}"
    return "ok" if behind is None else f"{behind}: run `retrieval db upgrade`"


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and a model + index pair is loaded. `detail` names the served pair, the
    queue depth, and the last hot swap and its error, if any (the old pair keeps serving after a failed swap)."""
    state = request.app.state
    serving = state.serving
    detail: dict = {"database": await run_in_threadpool(_database_ok, state.settings.resolved_database_url)}
    ready = detail["database"] == "ok"
    deployment = getattr(state, "deployment", None)
    if deployment is None:
        ready = False
        detail["index"] = serving.load_error or "no active index; run `retrieval index build SOURCE`"
    else:
        detail.update(model_version=deployment.model_name, index_version=deployment.index_name,
                      vectors=len(deployment.index), device=deployment.device,
                      runtime=deployment.runner.info.runtime, precision=deployment.runner.info.precision,
                      index_device=deployment.index_device)
    detail["queue_depth"] = state.batcher.depth
    detail["near_duplicate_threshold"] = state.settings.near_duplicate_threshold  # the page's "near-duplicates"
    detail["max_k"] = state.settings.max_k  # the largest k a search takes: the page's "Results" field follows it
    if serving.last_swap is not None:
        detail["last_swap"] = serving.last_swap
    if serving.swap_error is not None:
        detail["swap_error"] = serving.swap_error
    if serving.fallback is not None:
        detail["fallback"] = serving.fallback
    detail["pending_changes"] = serving.pending
    if serving.last_compaction is not None:
        detail["last_compaction"] = serving.last_compaction
    body = Health(status="ready" if ready else "not_ready", detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
