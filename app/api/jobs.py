"""Jobs for `retrieval worker`: POST /v1/jobs, GET /v1/jobs[/{id}[/logs]], POST /v1/jobs/{id}/cancel.

The API only inserts and reads job rows; training and embedding run in the worker process, never here.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app import jobs
from app.api.content_type import json_body
from app.api.deps import SessionDep
from app.auth import require_read, require_write
from app.errors import ApiError
from app.schemas import ErrorBody, UtcDatetime

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobKind = Literal[jobs.JOB_KINDS]  # Literal[("a", "b")] is Literal["a", "b"]
JobStatus = Literal[jobs.JOB_STATUSES]
JOB_ID = Path(ge=1, le=2**62)


class JobCreate(BaseModel):
    kind: JobKind = Field(description="train: retrain, evaluate, promote if better; rebuild_index; reembed.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="train: steps, batch_size, m_per_class, lr, loss {name, koleo, ...}, config (a TrainConfig "
                    "dict) or config_path, init ('active' or 'config'), image_size, val_fraction, split_seed, "
                    "force_promote, name. rebuild_index: factory. reembed: model_version, factory.",
    )
    max_attempts: int | None = Field(None, ge=1, le=jobs.MAX_ATTEMPTS,
                                     description="Runs before a job whose worker dies fails.")


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    params: dict[str, Any]
    progress: float
    message: str | None
    metrics: dict[str, Any]
    error: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    worker_id: str | None
    heartbeat_at: UtcDatetime | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class JobList(BaseModel):
    jobs: list[JobOut]


class JobLogs(BaseModel):
    id: int
    lines: list[str]


NOT_FOUND = {404: {"model": ErrorBody}}


@router.post("", response_model=JobOut, status_code=201,
             responses={code: {"model": ErrorBody} for code in (415, 422)},
             dependencies=[Depends(require_write), Depends(json_body('{"kind": "train", "params": {"steps": 500}}'))])
def create_job(request: Request, session: SessionDep, body: JobCreate) -> JobOut:
    settings = request.app.state.settings
    try:
        job = jobs.enqueue(session, body.kind, body.params, body.max_attempts or settings.job_max_attempts)
    except jobs.JobError as exc:
        raise ApiError(422, str(exc), code="invalid_request") from None
    out = JobOut.model_validate(job)
    session.commit()  # queued before the 201: a worker may claim it at once
    return out


@router.get("", response_model=JobList, responses={422: {"model": ErrorBody}}, dependencies=[Depends(require_read)])
def list_jobs(session: SessionDep,
              status: JobStatus | None = Query(None, description="Only jobs in this state."),
              kind: JobKind | None = Query(None, description="Only jobs of this kind."),
              limit: int = Query(50, ge=1, le=500)) -> JobList:
    """Newest first; a status or kind that no job can have is a 422 listing the accepted values."""
    return JobList(jobs=[JobOut.model_validate(j) for j in jobs.list_jobs(session, status, kind, limit)])


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND, dependencies=[Depends(require_read)])
def get_job(session: SessionDep, job_id: int = JOB_ID) -> JobOut:
    try:
        return JobOut.model_validate(jobs.get_job(session, job_id))
    except jobs.JobNotFound as exc:
        raise ApiError(404, str(exc)) from None


@router.get("/{job_id}/logs", response_model=JobLogs, responses=NOT_FOUND, dependencies=[Depends(require_read)])
def get_job_logs(request: Request, session: SessionDep, job_id: int = JOB_ID,
                 tail: int = Query(200, ge=1, le=10_000)) -> JobLogs:
    get_job(session, job_id)
    return JobLogs(id=job_id, lines=jobs.read_log(request.app.state.settings, job_id, tail))


@router.post("/{job_id}/cancel", response_model=JobOut, responses={**NOT_FOUND, 409: {"model": ErrorBody}},
             dependencies=[Depends(require_write)])
def cancel_job(session: SessionDep, job_id: int = JOB_ID) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its worker's next heartbeat."""
    try:
        cancelled = JobOut.model_validate(jobs.request_cancel(session, job_id))
    except jobs.JobNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except jobs.JobFinished as exc:
        raise ApiError(409, str(exc)) from None
    session.commit()
    return cancelled
