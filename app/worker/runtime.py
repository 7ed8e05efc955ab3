"""`retrieval worker`: the process that runs jobs (train, rebuild_index, reembed) claimed from the SQL queue.

The API never trains or embeds: it inserts job rows (app.jobs.enqueue) and reads them. A worker loops:
sweep stale jobs (their worker stopped heartbeating) back to the queue or to 'failed', claim the oldest queued
job, run it with a heartbeat thread beside it, and record the outcome. Several workers may run at once, on one
machine or many that share the database and the data directory.

Progress goes to the job row (progress, message, metrics: visible at GET /v1/jobs/{id}), to stdout, and to a
log file <data_dir>/jobs/<id>/job.log (GET /v1/jobs/{id}/logs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from app import jobs
from app.db.models import Job
from app.db.session import session_scope
from app.settings import Settings
from app.worker.context import JobContext, JobStopped, heartbeat_loop
from app.worker.index_jobs import run_rebuild_index, run_reembed
from app.worker.training import run_train
from index.builders import FactoryError

HANDLERS: dict[str, Callable[[JobContext], dict[str, Any]]] = {
    "train": run_train,
    "rebuild_index": run_rebuild_index,
    "reembed": run_reembed,
}


# -- the loop --------------------------------------------------------------------------------------------------

def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _set_torch_threads(n: int) -> int:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    return previous


def run_job(settings: Settings, job: Job, worker_id: str, shutdown: threading.Event) -> str:
    """Run one claimed job to its end; returns the status recorded ('succeeded', 'failed', ...)."""
    url = settings.resolved_database_url
    ctx = JobContext(settings, job, worker_id, shutdown)
    ctx.log(f"claimed by {worker_id} (attempt {job.attempts}/{job.max_attempts}) params={json.dumps(job.params)}")
    done = threading.Event()
    beat = threading.Thread(target=heartbeat_loop, args=(ctx, settings.worker_heartbeat_s, done),
                            name=f"heartbeat-{job.id}", daemon=True)
    beat.start()
    threads = job.params.get("torch_threads")
    previous_threads = _set_torch_threads(int(threads)) if threads else None
    try:
        handler = HANDLERS[job.kind]
        metrics = handler(ctx)
        status, message, error = "succeeded", ctx.message, None
    except JobStopped as exc:
        metrics, error = ctx.metrics, None
        status, message = ("cancelled", "cancelled") if ctx.cancelled.is_set() else ("stopped", str(exc))
    except Exception as exc:  # any failure is recorded on the job, the worker goes on
        metrics, status, message = ctx.metrics, "failed", f"failed: {exc.__class__.__name__}: {exc}"
        # A job asked for what cannot be done (an index type the corpus is too small to train) is said in one
        # line, as the CLI says it; any other failure keeps its traceback.
        error = str(exc) if isinstance(exc, FactoryError) else traceback.format_exc(limit=8)[-4000:]
        ctx.log(error)
    finally:
        done.set()
        beat.join(timeout=10)
        if previous_threads is not None:  # the next job gets the worker's own setting back
            _set_torch_threads(previous_threads)
    if ctx.lost.is_set():
        ctx.log("another worker took this job over (this one was presumed dead); leaving it")
        return "lost"
    if status == "stopped":  # shutting down: hand the job back; the next worker resumes from its checkpoint
        jobs.release(url, job.id, worker_id, "re-queued: worker shut down")
        ctx.log("handed back to the queue: worker shutting down")
        return "queued"
    jobs.finish(url, job.id, worker_id, status, message=message, metrics=metrics, error=error)
    ctx.log(f"{status}: {message}")
    return status


def run_worker(settings: Settings, worker_id: str | None = None, once: bool = False, max_jobs: int | None = None,
               shutdown: threading.Event | None = None, handle_signals: bool = False) -> int:
    """Claim and run jobs until `shutdown` is set (or SIGTERM/SIGINT with handle_signals), or the queue is empty
    (`once`). On SIGTERM a running job is stopped at its next step and handed back to the queue."""
    worker_id = worker_id or default_worker_id()
    shutdown = shutdown or threading.Event()
    url = settings.resolved_database_url
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: shutdown.set())
    print(f"worker {worker_id} polling {settings.data_dir} every {settings.worker_poll_s:g}s "
          f"(heartbeat {settings.worker_heartbeat_s:g}s, stale after {settings.worker_stale_after_s:g}s)", flush=True)
    ran = 0
    while not shutdown.is_set():
        stale = jobs.requeue_stale(url, settings.worker_stale_after_s)
        for job_id in stale.requeued:
            print(f"job {job_id}: its worker died; re-queued", flush=True)
        for job_id in stale.failed:
            print(f"job {job_id}: its worker died and it has no runs left; failed", flush=True)
        job = jobs.claim(url, worker_id)
        if job is None:
            if once:
                break
            shutdown.wait(settings.worker_poll_s)
            continue
        run_job(settings, job, worker_id, shutdown)
        ran += 1
        if max_jobs is not None and ran >= max_jobs:
            break
    print(f"worker {worker_id} stopping after {ran} job(s)", flush=True)
    return ran


def wait_for(settings: Settings, job_id: int, timeout: float | None = None,
             on_change: Callable[[Job], None] | None = None, poll_s: float = 1.0) -> Job:
    """Poll a job until it finishes (for `retrieval jobs follow`); calls on_change when its state moves."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: tuple | None = None
    while True:
        with session_scope(settings.resolved_database_url) as session:
            job = jobs.get_job(session, job_id)
            session.expunge(job)
        state = (job.status, round(job.progress, 4), job.message)
        if state != seen and on_change is not None:
            on_change(job)
        seen = state
        if job.status in jobs.FINISHED:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
        time.sleep(poll_s)
