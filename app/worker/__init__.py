"""The worker: runtime.py claims jobs from the SQL queue (app.jobs) and runs them with a heartbeat
(context.py); training.py is the train job, index_jobs.py the rebuild_index and reembed jobs. Its commands,
`retrieval worker` and `retrieval jobs`, are in app/cli.py."""

from app.worker.context import JobContext, JobStopped
from app.worker.runtime import HANDLERS, default_worker_id, run_job, run_worker, wait_for

__all__ = ["HANDLERS", "JobContext", "JobStopped", "default_worker_id", "run_job", "run_worker", "wait_for"]
