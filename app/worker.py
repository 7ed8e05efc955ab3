"""`retrieval worker`: the process that runs jobs (train, rebuild_index, reembed) claimed from the SQL queue.

The API never trains or embeds: it inserts job rows (app.jobs.enqueue) and reads them. A worker loops:
sweep stale jobs (their worker stopped heartbeating) back to the queue or to 'failed', claim the oldest queued
job, run it with a heartbeat thread beside it, and record the outcome. Several workers may run at once, on one
machine or many that share the database and the data directory.

A training job (kind 'train'):
  1. the labelled live images of the store, classes split into train and validation deterministically (the split
     is saved in the job's directory, so a re-run uses the same one even if images arrived meanwhile);
  2. models.train.train() fine-tunes the active model (IRT recipe by default: contrastive + cross-batch memory +
     KoLeo, lambda 0.7) in <data_dir>/jobs/<id>/train, resuming from its last checkpoint after a crash;
  3. the candidate and the active model are evaluated on the same validation split (Recall@K, MAP@R);
  4. the candidate is registered as a model version with its metrics (status 'candidate');
  5. if it is better (Recall@1, then MAP@R) or `force_promote` is set: the whole corpus is re-embedded with it and
     a new index version is built and promoted together with the model in one SQL transaction
     (app.indexing.publish_index -> app.registry.promote). The service hot-swaps to the new pair.

Progress goes to the job row (progress, message, metrics: visible at GET /v1/jobs/{id}), to stdout, and to a
log file <data_dir>/jobs/<id>/job.log (GET /v1/jobs/{id}/logs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from app import jobs
from app.db.models import Image, Job, ModelVersion
from app.db.session import session_scope
from app.jobs import LOG_FILE, TRAIN_FIELDS, job_dir
from app.settings import Settings

log = logging.getLogger("retrieval.worker")

SPLIT_FILE = "split.json"


class JobStopped(Exception):
    """The run stopped before the end: cancel requested, lost ownership, or the worker is shutting down."""


class JobContext:
    """What a job handler sees: its params and directory, progress reporting, and the stop flag."""

    def __init__(self, settings: Settings, job: Job, worker_id: str, shutdown: threading.Event) -> None:
        self.settings = settings
        self.job_id = job.id
        self.kind = job.kind
        self.params: dict[str, Any] = dict(job.params or {})
        self.attempt = job.attempts
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
        self._dirty = True

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
            self._dirty = True

    def flush(self) -> None:
        """Write progress to the row now (the heartbeat thread also does, every few seconds)."""
        with self._lock:
            progress, message, metrics = self.progress_value, self.message, dict(self.metrics)
            self._dirty = False
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


def _heartbeat_loop(ctx: JobContext, interval: float, done: threading.Event) -> None:
    while not done.wait(interval):
        try:
            ctx.flush()
        except Exception:  # noqa: BLE001 - a database blip must not kill the job; the next beat retries
            log.exception("heartbeat for job %s failed", ctx.job_id)
        if ctx.lost.is_set():
            return


# -- the store's labelled images and the deterministic class split -------------------------------------------

def labelled_items(settings: Settings) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label index) of every live labelled image, and the class names (label i = names[i], sorted)."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Image.uri, Image.label).where(Image.deleted_at.is_(None), Image.label.is_not(None))
            .order_by(Image.id)
        ).all()
    names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    return [(uri.removeprefix("file://"), index[label]) for uri, label in rows], names


def class_split(ctx: JobContext) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Train/validation items with disjoint classes; fixed at the job's first run (saved in its directory)."""

    def compute() -> dict[str, Any]:
        from models.data import split_items

        items, names = labelled_items(ctx.settings)
        if len(names) < 4:
            raise ValueError(f"training needs labelled images of at least 4 classes in the store; found {len(names)}")
        fraction = float(ctx.params.get("val_fraction", 0.25))
        train_items, val_items = split_items(items, fraction, by="classes", seed=int(ctx.params.get("split_seed", 0)))
        return {"classes": names, "train": train_items, "val": val_items}

    saved = _fixed(ctx, SPLIT_FILE, compute)
    return [tuple(x) for x in saved["train"]], [tuple(x) for x in saved["val"]]


# -- handlers ------------------------------------------------------------------------------------------------

def train_config(params: dict[str, Any]) -> Any:
    """TrainConfig from job params: a YAML file (`config_path`), a dict (`config`), then the shortcut fields."""
    from models.config import TrainConfig, load_config

    if params.get("config_path"):
        config = load_config(params["config_path"])
    else:
        config = TrainConfig.from_dict(dict(params.get("config") or {}))
    for name in TRAIN_FIELDS:
        if name in params:
            setattr(config, name, params[name])
    if "loss" in params:
        config.loss = dict(params["loss"])
    if "image_size" in params:  # applies when training from the config's embedder (init="config")
        config.embedder = {**config.embedder, "image_size": int(params["image_size"]),
                           "resize_size": int(params.get("resize_size", params["image_size"]))}
    return config


def _is_better(candidate: dict[str, float], baseline: dict[str, float]) -> bool:
    """Recall@1 decides; MAP@R breaks a tie. Equal is not better: promoting costs a re-embed."""
    key = lambda m: (round(m.get("recall@1", 0.0), 6), round(m.get("map@r", 0.0), 6))  # noqa: E731
    return key(candidate) > key(baseline)


def _active_model(settings: Settings) -> ModelVersion:
    from app.registry import ensure_model_version

    with session_scope(settings.resolved_database_url) as session:
        model = ensure_model_version(session, settings)
        session.expunge(model)
    return model


def _model_row(settings: Settings, name: str) -> ModelVersion | None:
    with session_scope(settings.resolved_database_url) as session:
        model = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if model is not None:
            session.expunge(model)
        return model


def _fixed(ctx: JobContext, filename: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A value computed at the job's first run and saved in its directory; later runs read it back."""
    path = ctx.dir / filename
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return value


def _active_index_name(settings: Settings) -> str | None:
    from app.registry import active_index

    with session_scope(settings.resolved_database_url) as session:
        row = active_index(session)
        return row.name if row is not None else None


def publish_for_model(ctx: JobContext, model: ModelVersion, start: float, end: float,
                      factory: str | None = None, force: bool = True) -> dict[str, Any]:
    """Embed every live image missing an embedding for `model`, build an index, promote the pair (one transaction)."""
    from app.indexing import BuildReport, embed_missing, publish_index

    report = BuildReport()
    ctx.progress(start, f"embedding the corpus with {model.name}")
    embed_missing(ctx.settings, model, None, report, progress=False, stem_prefix=f"job{ctx.job_id}")
    ctx.check()
    ctx.progress(start + (end - start) * 0.7, f"building the index for {model.name}", embedded=report.embedded)
    publish_index(ctx.settings, model, report, factory=factory, force=force)
    ctx.progress(end, report.message or f"published {report.index_version_name}")
    return {"embedded": report.embedded, "index_version": report.index_version_name,
            "indexed": report.total_indexed, "factory": report.factory}


def run_train(ctx: JobContext) -> dict[str, Any]:
    from app.images import file_loader
    from models.checkpoint import load_checkpoint, read_config
    from models.evaluate import evaluate_items
    from models.train import train

    settings, params = ctx.settings, ctx.params
    load_image = file_loader(settings)  # train and judge on the pixels the service decodes
    config = train_config(params)
    train_items, val_items = class_split(ctx)
    ctx.progress(0.02, f"split: {len(train_items)} train / {len(val_items)} validation images "
                       f"({len({y for _, y in train_items})} / {len({y for _, y in val_items})} classes)")
    active = _fixed(ctx, "baseline.json", lambda: {"name": (m := _active_model(settings)).name, "path": m.path})
    init = None if params.get("init") == "config" else active["path"]

    def on_record(entry: dict[str, Any]) -> None:
        fraction = 0.02 + 0.68 * min(1.0, entry.get("step", 0) / max(1, config.steps))
        shown = {k: round(v, 4) for k, v in entry.items() if isinstance(v, float)}
        ctx.progress(fraction, f"{entry.get('event')} step {entry.get('step')}/{config.steps} {shown}")

    result = train(config, train_items, val_items, ctx.dir / "train", load_image, init_checkpoint=init,
                   device=settings.device, progress=on_record, should_stop=ctx.should_stop)
    if result.stopped:
        raise JobStopped(ctx.stop_reason())
    ctx.check()

    ks = tuple(params.get("ks", (1, 2, 4, 8)))
    ctx.progress(0.72, "evaluating the candidate and the active model on the validation split")
    workers = min(config.num_workers, 2)
    # Fixed at the first evaluation: a re-run after a crash compares against the same baseline, even if the
    # candidate was already promoted by the run that crashed.
    evaluation = _fixed(ctx, "evaluation.json", lambda: {
        "candidate": evaluate_items(load_checkpoint(result.best_checkpoint_dir), val_items, load_image, ks,
                                    num_workers=workers),
        "baseline": evaluate_items(load_checkpoint(active["path"]), val_items, load_image, ks, num_workers=workers),
    })
    candidate_metrics, active_metrics = evaluation["candidate"], evaluation["baseline"]
    better = _is_better(candidate_metrics, active_metrics)
    promote = better or bool(params.get("force_promote", False))
    summary = {"candidate": candidate_metrics, "baseline": active_metrics, "baseline_model": active["name"],
               "better": better, "train_steps": result.step, "promoted": False}
    ctx.progress(0.78, f"candidate recall@1={candidate_metrics.get('recall@1', 0):.4f} "
                       f"map@r={candidate_metrics.get('map@r', 0):.4f} vs active {active['name']} "
                       f"recall@1={active_metrics.get('recall@1', 0):.4f} map@r={active_metrics.get('map@r', 0):.4f}",
                 **summary)

    # Register the candidate (idempotent: a re-run after a crash finds the row by its name).
    name = str(params.get("name") or f"model-job{ctx.job_id}")
    model = _model_row(settings, name)
    if model is None:
        from app.registry import register_model

        target = settings.models_dir / name
        tmp = settings.models_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result.best_checkpoint_dir, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # the files are in place before the row exists
        config_used = read_config(target)
        with session_scope(settings.resolved_database_url) as session:
            model = register_model(session, target.resolve(), name,
                                   config_used.backbone if config_used.arch == "timm" else config_used.arch,
                                   config_used.dim, metrics={**candidate_metrics, "job_id": ctx.job_id,
                                                             "baseline": active_metrics,
                                                             "baseline_model": active["name"]})
            session.expunge(model)
    summary["model_version"] = model.name
    ctx.progress(0.8, f"registered model version {model.name}", model_version=model.name)
    if not promote:
        ctx.progress(1.0, f"not promoted: candidate {model.name} is not better than {active['name']}", **summary)
        return summary
    if model.status == "active":  # promoted by an earlier run of this job that died before recording it
        summary.update(promoted=True, index_version=_active_index_name(settings))
        ctx.progress(1.0, f"{model.name} is already active", **summary)
        return summary
    ctx.check()
    why = "better" if better else "force_promote"
    published = publish_for_model(ctx, model, 0.8, 0.99, factory=params.get("factory"))
    summary.update(published, promoted=True)
    ctx.progress(1.0, f"promoted {model.name} + {published['index_version']} ({why})", **summary)
    return summary


def run_rebuild_index(ctx: JobContext) -> dict[str, Any]:
    """Re-type or compact the active model's index from stored embeddings, and promote it."""
    return publish_for_model(ctx, _active_model(ctx.settings), 0.05, 1.0, factory=ctx.params.get("factory"))


def run_reembed(ctx: JobContext) -> dict[str, Any]:
    """Embed the corpus with a model version (`model_version`, default the active one) and promote its index."""
    wanted = ctx.params.get("model_version")
    model = _model_row(ctx.settings, wanted) if wanted else _active_model(ctx.settings)
    if model is None:
        raise ValueError(f"model version {wanted!r} does not exist")
    return publish_for_model(ctx, model, 0.05, 1.0, factory=ctx.params.get("factory"))


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
    beat = threading.Thread(target=_heartbeat_loop, args=(ctx, settings.worker_heartbeat_s, done),
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
    except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job, the worker goes on
        metrics, status, message = ctx.metrics, "failed", f"failed: {exc.__class__.__name__}: {exc}"
        error = traceback.format_exc(limit=8)[-4000:]
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
            if job is None:
                raise jobs.JobError(f"job {job_id} does not exist")
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


# -- CLI: `retrieval worker` and `retrieval jobs` (registered by app.cli) --------------------------------------

def _job_line(job: Job) -> str:
    return (f"{job.id:>5} {job.kind:<13} {job.status:<9} {job.progress:6.1%} attempts {job.attempts}/"
            f"{job.max_attempts} {job.message or ''}")


def cmd_worker(args: Any) -> int:
    from app.settings import get_settings

    logging.getLogger("retrieval").setLevel(logging.INFO)
    run_worker(get_settings(), worker_id=args.id, once=args.once, max_jobs=args.max_jobs, handle_signals=True)
    return 0


def cmd_jobs(args: Any) -> int:
    import yaml

    from app.settings import get_settings

    settings = get_settings()
    url = settings.resolved_database_url
    action = args.jobs_command or "list"
    if action == "list":
        with session_scope(url) as session:
            for job in reversed(jobs.list_jobs(session, args.status, args.kind, args.limit)):
                print(_job_line(job))
        return 0
    if action == "submit":
        params = json.loads(args.params) if args.params else {}
        for item in args.set or []:
            key, _, value = item.partition("=")
            params[key.strip()] = yaml.safe_load(value)  # numbers, booleans, lists, dicts as YAML
        with session_scope(url) as session:
            job = jobs.enqueue(session, args.kind, params, args.max_attempts or settings.job_max_attempts)
            job_id = job.id
        print(f"job {job_id} queued")
        if not args.follow:
            return 0
        args.id = job_id
        action = "follow"
    if action == "show":
        with session_scope(url) as session:
            job = jobs.get_job(session, args.id)
            if job is None:
                print(f"job {args.id} does not exist")
                return 1
            row = {c.name: getattr(job, c.name) for c in Job.__table__.columns}
        print(json.dumps(row, indent=2, default=str))
        return 0
    if action == "logs":
        print("\n".join(jobs.read_log(settings, args.id, args.tail)))
        return 0
    if action == "cancel":
        with session_scope(url) as session:
            job = jobs.request_cancel(session, args.id)
            print(_job_line(job))
        return 0
    # follow: print each change until the job finishes; the exit status says how it ended.
    job = wait_for(settings, args.id, timeout=args.timeout, on_change=lambda j: print(_job_line(j), flush=True))
    if job.error:
        print(job.error)
    return 0 if job.status == "succeeded" else 1


def add_cli(sub: Any) -> None:
    """Register `worker` and `jobs` on the `retrieval` parser's subcommands."""
    worker = sub.add_parser("worker", help="run queued jobs (train, rebuild_index, reembed) until stopped")
    worker.add_argument("--once", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    worker.add_argument("--id", help="worker id shown on its jobs (default host-pid-random)")
    worker.set_defaults(func=cmd_worker)

    jobs_parser = sub.add_parser("jobs", help="list, submit, follow and cancel worker jobs")
    jobs_parser.set_defaults(func=cmd_jobs, jobs_command=None, status=None, kind=None, limit=20)
    jsub = jobs_parser.add_subparsers(dest="jobs_command")
    listing = jsub.add_parser("list", help="recent jobs (default)")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--kind", choices=list(jobs.JOB_KINDS))
    listing.add_argument("--limit", type=int, default=20)
    submit = jsub.add_parser("submit", help="queue a job")
    submit.add_argument("kind", choices=list(jobs.JOB_KINDS))
    submit.add_argument("--set", action="append", metavar="KEY=VALUE", help="a job param, e.g. steps=200")
    submit.add_argument("--params", help="job params as a JSON object")
    submit.add_argument("--max-attempts", type=int)
    submit.add_argument("--follow", action="store_true", help="then follow it until it finishes")
    submit.add_argument("--timeout", type=float)
    for name, text in (("show", "one job as JSON"), ("follow", "print progress until the job finishes"),
                       ("logs", "the job's log"), ("cancel", "cancel a queued job or stop a running one")):
        p = jsub.add_parser(name, help=text)
        p.add_argument("id", type=int)
        if name == "follow":
            p.add_argument("--timeout", type=float)
        if name == "logs":
            p.add_argument("--tail", type=int, default=200)
