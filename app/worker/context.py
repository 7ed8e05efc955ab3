"""What a job handler sees (JobContext: params, directory, progress, the stop flag) and the heartbeat that
writes its progress to the job row and notices a cancel or a lost claim."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from app import jobs
from app.db.models import Job
from app.jobs import LOG_FILE, job_dir
from app.settings import Settings

log = logging.getLogger("retrieval.worker")


class JobStopped(Exception):
    """The run stopped before the end: cancel requested, lost ownership, or the worker is shutting down."""


class JobContext:
    """What a job handler sees: its params and directory, progress reporting, and the stop flag."""

    def __init__(self, settings: Settings, job: Job, worker_id: str, shutdown: threading.Event) -> None:
        self.settings = settings
        self.job_id = job.id
        self.kind = job.kind
        self.params: dict[str, Any] = dict(job.params or {})
        self.worker_id = worker_id
        self.dir = job_dir(settings, job.id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress_value = 0.0
        self.message = "started"
        self.metrics: dict[str, Any] = dict(job.metrics or {})
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.shutdown = shutdown
        self._lock = threading.Lock()

    # -- reporting -------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        line = f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%S')} job {self.job_id} [{self.kind}] {message}"
        print(line, flush=True)  # stdout is the worker's log
        with (self.dir / LOG_FILE).open("a") as f:
            f.write(line + "\n")

    def progress(self, fraction: float, message: str | None = None, **metrics: Any) -> None:
        with self._lock:
            self.progress_value = max(0.0, min(1.0, fraction))
            if message is not None and message != self.message:
                self.message = message
                self.log(f"{fraction:6.1%} {message}")
            self.metrics.update(metrics)

    def flush(self) -> None:
        """Write progress to the row now (the heartbeat thread also does, every few seconds)."""
        with self._lock:
            progress, message, metrics = self.progress_value, self.message, dict(self.metrics)
        beat = jobs.heartbeat(self.settings.resolved_database_url, self.job_id, self.worker_id, progress, message,
                              metrics)
        if not beat.owned:
            self.lost.set()
        elif beat.cancel_requested:
            self.cancelled.set()

    # -- stopping --------------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set() or self.shutdown.is_set()

    def check(self) -> None:
        if self.should_stop():
            raise JobStopped(self.stop_reason())

    def stop_reason(self) -> str:
        if self.lost.is_set():
            return "this worker no longer owns the job"
        if self.cancelled.is_set():
            return "cancelled"
        return "worker shutting down"


def heartbeat_loop(ctx: JobContext, interval: float, done: threading.Event) -> None:
    while not done.wait(interval):
        try:
            ctx.flush()
        except Exception:  # a database blip must not kill the job; the next beat retries
            log.exception("heartbeat for job %s failed", ctx.job_id)
        if ctx.lost.is_set():
            return


def fixed(ctx: JobContext, filename: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A value computed at the job's first run and saved in its directory; later runs read it back."""
    path = ctx.dir / filename
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return value
