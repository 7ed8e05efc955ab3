"""The job queue in SQL: enqueue, claim, heartbeat, re-queue stale jobs, cancel, finish.

The API only calls `enqueue`, `get_job`, `list_jobs` and `request_cancel`; everything else is the worker's.

Claiming is one atomic statement, so several workers (processes or machines) never run the same job:
    UPDATE jobs SET status='running', worker_id=:me, attempts=attempts+1, ...
    WHERE id = (SELECT id FROM jobs WHERE status='queued' ORDER BY created_at, id LIMIT 1 [FOR UPDATE SKIP LOCKED])
      AND status = 'queued'
    RETURNING id
On PostgreSQL the sub-select locks the row it picks and skips rows other claimers hold, so concurrent claimers
take different jobs without waiting. On SQLite the statement runs under the database's single write lock (it is
the first statement of its transaction, so its snapshot is taken with the lock), and `AND status='queued'` makes
a lost race update nothing.

Every later write from the worker is conditional on `worker_id = :me AND status = 'running'`: a worker that was
presumed dead (its job re-queued and claimed by another) finds it no longer owns the job and stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import Job, ModelVersion
from app.db.session import get_engine, session_scope
from app.settings import Settings

JOB_KINDS = ("train", "rebuild_index", "reembed")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 20  # the most runs a job may be given (the API's and the CLI's bound)
# TrainConfig fields (models/config.py) a train job may set directly.
TRAIN_FIELDS = ("steps", "batch_size", "m_per_class", "lr", "head_lr", "loss_lr", "weight_decay", "warmup_steps",
                "seed", "num_workers", "eval_every", "checkpoint_every", "log_every", "eval_batch_size", "amp",
                "grad_clip", "min_lr_ratio")
# The params each kind understands; anything else is refused at enqueue time, so a typo is a 422, not a run.
JOB_PARAMS = {
    "train": {*TRAIN_FIELDS, "config", "config_path", "loss", "init", "image_size", "resize_size", "val_fraction",
              "split_seed", "force_promote", "name", "factory", "ks", "torch_threads", "nproc"},
    "rebuild_index": {"factory"},
    "reembed": {"model_version", "factory"},
}
LOG_FILE = "job.log"


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobError(ValueError):
    """A request the queue refuses (unknown kind, unknown job)."""


class JobNotFound(JobError):
    """No job has that id (the API's 404)."""


class JobFinished(JobError):
    """The job already succeeded or failed: nothing left to cancel (the API's 409)."""


def _check_factory(session: Session, kind: str, params: dict[str, Any]) -> None:
    """A `factory` FAISS cannot make for the model the job indexes with is a JobError now, not a failed job later
    (a train job's model, and so its dimension, does not exist yet)."""
    factory = params.get("factory")
    if factory is None or kind == "train":
        return
    if not isinstance(factory, str):
        raise JobError(f"factory is a FAISS index factory string like 'IVF1024,Flat'; got {factory!r}")
    from index.builders import FactoryError, check_factory  # faiss: not for the CLI's SQL-only commands

    named = params.get("model_version") if kind == "reembed" else None
    model = session.scalar(select(ModelVersion).where(
        ModelVersion.name == named if named else ModelVersion.status == "active"))
    if model is None:  # no model yet: the job itself says so
        return
    try:
        check_factory(factory, model.dim)
    except FactoryError as exc:
        raise JobError(str(exc)) from None


def _check_model_version(session: Session, kind: str, params: dict[str, Any]) -> None:
    """A reembed's `model_version` that is neither registered nor an embedder to register is a JobError now."""
    from app.registry import embedder_version_name, is_embedder_spec, name_taken, unknown_model_message

    wanted = params.get("model_version") if kind == "reembed" else None
    if wanted is None:
        return
    if not isinstance(wanted, str) or not wanted:
        raise JobError(f"model_version is a model version's name, a preset or a checkpoint directory; got {wanted!r}")
    if session.scalar(select(ModelVersion.id).where(ModelVersion.name == wanted)) is not None:
        return
    if not is_embedder_spec(wanted):
        raise JobError(unknown_model_message(session, wanted))
    name = embedder_version_name(wanted)
    if name != wanted:  # a checkpoint directory, registered under its folder name: that version may be another's
        named = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if named is not None and (taken := name_taken(named, wanted)) is not None:
            raise JobError(taken)


def enqueue(session: Session, kind: str, params: dict[str, Any] | None = None,
            max_attempts: int = 3) -> Job:
    if kind not in JOB_KINDS:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(JOB_KINDS)}")
    if max_attempts < 1:
        raise JobError("max_attempts must be at least 1")
    unknown = set(params or {}) - JOB_PARAMS[kind]
    if unknown:
        raise JobError(f"unknown {kind} params {sorted(unknown)}; known: {sorted(JOB_PARAMS[kind])}")
    _check_model_version(session, kind, params or {})
    _check_factory(session, kind, params or {})
    nproc = (params or {}).get("nproc", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise JobError(f"nproc is the number of training processes (torchrun), an integer >= 1; got {nproc!r}")
    job = Job(kind=kind, status="queued", params=dict(params or {}), progress=0.0, metrics={}, attempts=0,
              max_attempts=max_attempts, cancel_requested=False, created_at=utcnow(), message="queued")
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job:
    """The job, or JobNotFound."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return job


def list_jobs(session: Session, status: str | None = None, kind: str | None = None, limit: int = 50) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    return list(session.scalars(query))


def claim(url: str, worker_id: str) -> Job | None:
    """Take the oldest queued job for `worker_id`, or None. One statement; safe with many concurrent workers."""
    engine = get_engine(url)
    now = utcnow()
    pick = select(Job.id).where(Job.status == "queued").order_by(Job.created_at, Job.id).limit(1)
    if engine.dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    stmt = (
        update(Job)
        .where(Job.id == pick.scalar_subquery(), Job.status == "queued")
        .values(status="running", worker_id=worker_id, attempts=Job.attempts + 1, heartbeat_at=now,
                started_at=now, error=None, message="claimed by " + worker_id)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    # A fresh connection whose first statement is the UPDATE: on SQLite (WAL) a transaction that read before
    # writing could fail with a stale snapshot instead of waiting for the lock.
    with engine.begin() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        return None
    with session_scope(url) as session:
        return session.get(Job, row[0])


@dataclass
class Beat:
    """What a heartbeat learned: the worker still owns the job, and whether a cancel was asked for."""

    owned: bool
    cancel_requested: bool


def _update_owned(url: str, job_id: int, worker_id: str, values: dict[str, Any]) -> bool | None:
    """Update a job the worker still owns; None if it does not, else the job's cancel_requested flag."""
    values = {k: v for k, v in values.items() if v is not None or k == "error"}
    with get_engine(url).begin() as conn:
        row = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
            .values(**values)
            .returning(Job.cancel_requested)
        ).first()
    return None if row is None else bool(row[0])


def heartbeat(url: str, job_id: int, worker_id: str, progress: float | None = None, message: str | None = None,
              metrics: dict[str, Any] | None = None) -> Beat:
    clamped = None if progress is None else max(0.0, min(1.0, float(progress)))
    cancel = _update_owned(url, job_id, worker_id, {"heartbeat_at": utcnow(), "progress": clamped,
                                                    "message": message, "metrics": metrics})
    return Beat(owned=cancel is not None, cancel_requested=bool(cancel))


def finish(url: str, job_id: int, worker_id: str, status: str, message: str | None = None,
           metrics: dict[str, Any] | None = None, error: str | None = None) -> bool:
    """Record the end of a run the worker still owns; False if it no longer does (it was presumed dead)."""
    if status not in FINISHED:
        raise JobError(f"a job finishes as one of {FINISHED}, not {status!r}")
    values = {"status": status, "finished_at": utcnow(), "heartbeat_at": utcnow(), "error": error,
              "progress": 1.0 if status == "succeeded" else None, "message": message, "metrics": metrics}
    return _update_owned(url, job_id, worker_id, values) is not None


def release(url: str, job_id: int, worker_id: str, message: str) -> bool:
    """Give a running job back to the queue (a worker shutting down cleanly); the run does not count."""
    with get_engine(url).begin() as conn:
        result = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
            .values(status="queued", worker_id=None, attempts=Job.attempts - 1, message=message)
        )
    return result.rowcount == 1


def request_cancel(session: Session, job_id: int) -> Job:
    """Cancel a queued job now; ask a running one to stop (its worker sees the flag at the next heartbeat).
    JobNotFound, or JobFinished for a job that already succeeded or failed."""
    job = get_job(session, job_id)
    if job.status in ("succeeded", "failed"):
        raise JobFinished(f"job {job_id} already {job.status}")
    now = utcnow()
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, message="cancelled before it started")
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running")
        .values(cancel_requested=True, message="cancel requested")
        .execution_options(synchronize_session=False)
    )
    session.flush()
    session.refresh(job)
    return job


@dataclass
class StaleReport:
    requeued: list[int]
    failed: list[int]
    cancelled: list[int]


def requeue_stale(url: str, stale_after_s: float) -> StaleReport:
    """Jobs whose worker stopped heartbeating: re-queue them while runs remain, else fail them with the reason.

    Each UPDATE re-checks the stale condition, so two workers sweeping at once never act twice on one job, and
    a job whose worker heartbeats again in between is left alone.
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    stale = (Job.status == "running", Job.heartbeat_at < cutoff)
    report = StaleReport([], [], [])
    with get_engine(url).begin() as conn:
        rows = conn.execute(select(Job.id, Job.worker_id, Job.attempts).where(*stale)).all()
    for job_id, worker, attempts in rows:
        why = f"worker {worker} stopped heartbeating (no heartbeat for {stale_after_s:g}s)"
        with get_engine(url).begin() as conn:
            # A cancel asked of a dead worker's job is honoured rather than re-running it.
            if conn.execute(
                update(Job).where(Job.id == job_id, *stale, Job.cancel_requested.is_(True))
                .values(status="cancelled", finished_at=utcnow(), worker_id=None, message=f"cancelled; {why}")
            ).rowcount:
                report.cancelled.append(job_id)
                continue
            if conn.execute(
                update(Job).where(Job.id == job_id, *stale, Job.attempts < Job.max_attempts)
                .values(status="queued", worker_id=None, message=f"re-queued: {why}", error=why)
            ).rowcount:
                report.requeued.append(job_id)
                continue
            if conn.execute(
                update(Job).where(Job.id == job_id, *stale)
                .values(status="failed", finished_at=utcnow(), worker_id=None,
                        message="failed: no runs left", error=f"{why}; gave up after {attempts} runs")
            ).rowcount:
                report.failed.append(job_id)
    return report


def job_dir(settings: Settings, job_id: int) -> Path:
    """A job's working directory: its training run (checkpoints to resume from), split and log."""
    return settings.jobs_dir / str(job_id)


def read_log(settings: Settings, job_id: int, tail: int = 200) -> list[str]:
    path = job_dir(settings, job_id) / LOG_FILE
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-tail:]
