"""`retrieval`: the one command-line entry point and its one parser (db, index, serve, demo, backup, restore,
train, eval, worker, jobs, keys)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from app.cli_train import _override, add_train_eval_cli
from app.db.models import Job
from app.jobs import JOB_KINDS, JOB_PARAMS, JOB_STATUSES, MAX_ATTEMPTS
from app.settings import Settings, get_settings


def _port(value: str) -> int:
    port = _int(value, "--port")
    if not 1 <= port <= 65535:  # uvicorn would bind port % 65536 and log the number asked for
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535; got {value}")
    return port


def _positive(value: str) -> int:
    number = _int(value, "this option")
    if number < 1:
        raise argparse.ArgumentTypeError(f"needs an integer >= 1; got {value}")
    return number


def _attempts(value: str) -> int:
    number = _int(value, "--max-attempts")
    if not 1 <= number <= MAX_ATTEMPTS:  # the API's bound
        raise argparse.ArgumentTypeError(f"a job gets 1-{MAX_ATTEMPTS} runs; got {value}")
    return number


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} takes an integer; got {value!r}") from None


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at character {exc.pos}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"needs a JSON object like '{{\"factory\": \"Flat\"}}'; got {value!r}")
    return parsed


def _scopes(value: str) -> str:
    from app.auth import parse_scopes

    try:
        parse_scopes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/n, e.g. 0/4; got {value!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n; got {value!r}")
    return i, n


def cmd_db(args: argparse.Namespace) -> int:
    from app.db import migrate

    url = get_settings().resolved_database_url
    if url.startswith("sqlite"):
        get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    if args.action == "upgrade":
        migrate.upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        migrate.downgrade(url, args.revision or "-1")
    print(f"database at revision {migrate.current(url)}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from app.db import migrate
    from app.indexing import EmptySource, RayWorkersLost, build_index
    from app.indexing.sources import SourceError
    from index.builders import FactoryError

    settings = get_settings()
    if args.ray is not None and args.shard is not None:
        print("retrieval index build: --ray and --shard do not combine (Ray spreads the whole build itself)",
              file=sys.stderr)
        return 2
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        print("retrieval index build: --ray needs Ray Data: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    try:
        ray_address = None if args.ray is None else (args.ray or settings.ray_address or "")
        report = build_index(settings, args.source, shard=args.shard, factory=args.factory,
                             progress=not args.no_progress, ray_address=ray_address, prune=args.prune)
    except (EmptySource, FileNotFoundError, RayWorkersLost, SourceError, FactoryError) as exc:
        print(f"retrieval index build: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from app.errors import is_disk_full

        if not is_disk_full(exc):
            raise
        print(f"retrieval index build: the data volume is full ({settings.data_dir}): {exc.__class__.__name__}. "
              "Nothing half-written is used; free space and run the same command again to resume.", file=sys.stderr)
        return 1
    if args.no_progress:  # with progress on, build_index has printed the summary under its bars
        print(report.summary())
    return 1 if report.added == 0 and report.failed and not report.total_indexed else 0


def cmd_index_verify(args: argparse.Namespace) -> int:
    from app.indexing import verify_index

    report = verify_index(get_settings())
    pending = (f"; {report.pending} online change(s) pending compaction ({report.pending_adds} added, "
               f"{report.pending_deletes} deleted; served from the embedding store)") if report.pending else ""
    if report.missing_files:
        from app.indexing.report import first_few

        print(f"note: {len(report.missing_files)} live image file(s) are gone from disk "
              f"({first_few(report.missing_files)}): their thumbnails "
              "cannot be served; `retrieval index build FOLDER --prune` (or DELETE /v1/images/ID) retires them",
              file=sys.stderr)
    if report.ok:
        print(f"index {report.version}: SQL and index agree{pending}")
        return 0
    if report.version is None:
        print("retrieval index verify: no active index version yet: `retrieval index build FOLDER` builds one",
              file=sys.stderr)
        return 1
    print(f"index {report.version}: {len(report.problems)} problem(s)", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    print("`retrieval index rebuild` publishes a new version from SQL and the stored embeddings (embedding the live "
          "images that have none)", file=sys.stderr)
    return 1


def cmd_index_merge(args: argparse.Namespace) -> int:
    from app.indexing import merge_shards, rebuild_index

    settings = get_settings()
    if args.index_command == "compact":
        from app.indexing.compact import compact_index

        print(compact_index(settings, owner=f"cli-{os.getpid()}").message)
        return 0
    if args.index_command == "rebuild":
        report = rebuild_index(settings, factory=args.factory, progress=not args.no_progress)
    else:
        report = merge_shards(settings, factory=args.factory, ondisk=args.ondisk, progress=not args.no_progress)
    if args.no_progress:  # with progress on, the summary is printed under the bars
        print(report.summary())
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from app.backup import BackupError, backup, restore

    settings = get_settings()
    try:
        done = backup(settings, args.dir) if args.command == "backup" else restore(settings, args.dir)
    except BackupError as exc:
        print(f"retrieval {args.command}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.command} {args.dir}: {done['files']} files, rows {json.dumps(done['rows'])}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    workers = args.workers or settings.api_workers
    if workers > 1:
        share_the_machine_between_workers(settings, workers)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=args.log_level, timeout_graceful_shutdown=10)
    finally:
        if workers > 1:
            import shutil

            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return 0


def share_the_machine_between_workers(settings: Settings, workers: int) -> None:
    """Before uvicorn starts `workers` processes (they inherit this environment): each gets its share of the
    cores for its inference runtime and torch unless RETRIEVAL_INFERENCE_THREADS says otherwise (N runtimes each
    using every core oversubscribe them), and /metrics adds up every worker's series (prometheus_client's
    multiprocess mode, in a fresh directory: stale files of an earlier run would be counted)."""
    import tempfile

    from models.runtime import default_threads

    if settings.inference_threads == 0:
        os.environ["RETRIEVAL_INFERENCE_THREADS"] = str(max(1, default_threads() // workers))
    # A fresh directory of this server's own (never shared with another replica on the same volume).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="retrieval-metrics-")


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo index (once; re-runs add nothing) and serve it."""
    from app.db import migrate
    from app.demo import export_fashion_mnist
    from app.indexing import EmptySource, build_index
    from app.indexing.sources import SourceError

    settings = get_settings()
    corpus = settings.demo_source
    if corpus is not None and not corpus.exists():
        print(f"retrieval demo: RETRIEVAL_DEMO_SOURCE={corpus} does not exist (a folder of your images, sub-folder "
              "names as labels; unset it for Fashion-MNIST)", file=sys.stderr)
        return 1
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    try:
        exported = corpus is None
        if exported:
            corpus, queries = export_fashion_mnist(settings.data_dir, per_class=args.per_class)
            print(f"demo corpus: {corpus}\nheld-out query images: {queries}")
        # The exported folder is the demo's own: images an earlier, larger --per-class left are retired with it.
        build_index(settings, corpus, progress=True, prune=exported)
    except (EmptySource, FileNotFoundError, SourceError) as exc:  # Fashion-MNIST not installed, an empty folder
        print(f"retrieval demo: {exc}", file=sys.stderr)
        return 1
    if args.no_serve:
        return 0
    return cmd_serve(args)


def _job_line(job: Job) -> str:
    return (f"{job.id:>5} {job.kind:<13} {job.status:<9} {job.progress:6.1%} attempts {job.attempts}/"
            f"{job.max_attempts} {job.message or ''}")


def cmd_worker(args: argparse.Namespace) -> int:
    from app.worker import run_worker

    logging.getLogger("retrieval").setLevel(logging.INFO)
    run_worker(get_settings(), worker_id=args.id, once=args.once, max_jobs=args.max_jobs, handle_signals=True)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """Errors (no such job, a param the queue refuses) are JobErrors, said by main() in one line, exit 1."""
    from app import jobs
    from app.db.session import session_scope

    settings = get_settings()
    url = settings.resolved_database_url
    action = args.jobs_command or "list"
    if action == "list":
        with session_scope(url) as session:
            for job in reversed(jobs.list_jobs(session, args.status, args.kind, args.limit)):
                print(_job_line(job))
        return 0
    if action == "submit":
        params = dict(args.params or {})
        params.update(args.overrides)  # --set KEY=VALUE pairs, parsed by _override like train's
        with session_scope(url) as session:
            attempts = settings.job_max_attempts if args.max_attempts is None else args.max_attempts
            job = jobs.enqueue(session, args.kind, params, attempts)
            job_id = job.id
        print(f"job {job_id} queued")
        if not args.follow:
            return 0
        args.id = job_id
        action = "follow"
    if action == "show":
        with session_scope(url) as session:
            job = jobs.get_job(session, args.id)
            row = {c.name: getattr(job, c.name) for c in Job.__table__.columns}
        from app.schemas import utc_timestamp

        print(json.dumps({k: utc_timestamp(v) if isinstance(v, datetime) else v for k, v in row.items()}, indent=2,
                         default=str))
        return 0
    if action == "logs":
        with session_scope(url) as session:
            jobs.get_job(session, args.id)
        for line in jobs.read_log(settings, args.id, args.tail):  # a job no worker has started has no log yet
            print(line)
        return 0
    if action == "cancel":
        with session_scope(url) as session:
            job = jobs.request_cancel(session, args.id)
            print(_job_line(job))
        return 0
    # follow: print each change until the job finishes; the exit status says how it ended.
    from app.worker import wait_for  # imports faiss: only here

    try:
        job = wait_for(settings, args.id, timeout=args.timeout, on_change=lambda j: print(_job_line(j), flush=True))
    except TimeoutError as exc:
        raise jobs.JobError(f"{exc}; only the watching stopped (`retrieval jobs follow {args.id}` again)") from None
    if job.error:
        print(job.error)
    return 0 if job.status == "succeeded" else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.auth import create_api_key, revoke_api_key
    from app.db import migrate
    from app.db.models import ApiKey
    from app.db.session import session_scope

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # the SQLite file lives there by default
    url = settings.resolved_database_url
    migrate.upgrade(url)
    if args.keys_command == "create":
        key_id, plain = create_api_key(url, args.name, args.scopes)
        print(f"key {key_id} ({args.name}, scopes {args.scopes}); shown once, only its hash is stored:\n{plain}")
        return 0
    if args.keys_command == "revoke":
        if not revoke_api_key(url, args.id):
            print(f"no live key with id {args.id}")
            return 1
        print(f"key {args.id} revoked")
        return 0
    with session_scope(url) as session:
        for row in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            print(f"{row.id:>4}  {row.name:<24} {row.scopes:<12} {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema (Alembic)")
    db.add_argument("action", choices=["upgrade", "downgrade", "current"])
    db.add_argument("revision", nargs="?", help="target revision (upgrade: head; downgrade: -1)")
    db.set_defaults(func=cmd_db)

    index = sub.add_parser("index", help="build and check FAISS indexes")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", help="register, embed and index a folder or CSV manifest")
    build.add_argument("source", help="a folder (labels = sub-folder names), a CSV manifest (path,label,...) or "
                                      "one image file")
    build.add_argument("--shard", type=_shard, help="i/n: embed only shard i of n")
    build.add_argument("--factory", help="FAISS factory string overriding the automatic choice")
    build.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="embed on a Ray cluster: 'auto' joins the running one, host:port a given one; with no "
                            "address, RETRIEVAL_RAY_ADDRESS or else a local cluster started for this build")
    build.add_argument("--prune", action="store_true",
                       help="retire the images whose file has left the folder since it was registered (without it, "
                            "they are listed and stay searchable)")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=cmd_index_build)
    verify = index_sub.add_parser(
        "verify", help="check SQL and the active index agree (online changes not compacted are counted, not errors)")
    verify.set_defaults(func=cmd_index_verify)
    compact = index_sub.add_parser("compact", help="fold online adds/deletes into a new index version")
    compact.set_defaults(func=cmd_index_merge)
    for name, text in (("merge", "after sharded builds: embed what is missing, build and publish one index"),
                       ("rebuild", "rebuild/retype the index from stored embeddings (compacts deletions)")):
        step = index_sub.add_parser(name, help=text)
        step.add_argument("--factory", help="FAISS factory string overriding the automatic choice")
        step.add_argument("--ondisk", action="store_true", help="IVF: merge per-shard lists on disk")
        step.add_argument("--no-progress", action="store_true")
        step.set_defaults(func=cmd_index_merge)

    def add_serve_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="bind address (RETRIEVAL_HOST, default 127.0.0.1)")
        p.add_argument("--port", type=_port, help="port (RETRIEVAL_PORT, default 8000)")
        p.add_argument("--workers", type=_positive, help="worker processes (RETRIEVAL_API_WORKERS, default 1)")
        p.add_argument("--log-level", default="info")

    serve = sub.add_parser("serve", help="serve the REST API and the query page")
    add_serve_options(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="build a demo index from Fashion-MNIST (or RETRIEVAL_DEMO_SOURCE) and serve")
    add_serve_options(demo)
    demo.add_argument("--per-class", type=_positive, default=100, help="Fashion-MNIST images per class (default 100)")
    demo.add_argument("--no-serve", action="store_true", help="build the demo index and exit")
    demo.set_defaults(func=cmd_demo)

    for name, text in (("backup", "write a consistent snapshot of SQL and the data dir to DIR (while serving)"),
                       ("restore", "restore a snapshot from DIR into an empty data dir and database")):
        step = sub.add_parser(name, help=text)
        step.add_argument("dir", type=Path, help="the backup directory")
        step.set_defaults(func=cmd_backup)

    add_train_eval_cli(sub)

    worker = sub.add_parser("worker", help="run queued jobs (train, rebuild_index, reembed) until stopped")
    worker.add_argument("--once", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--max-jobs", type=_positive, help="exit after this many jobs")
    worker.add_argument("--id", help="worker id shown on its jobs (default host-pid-random)")
    worker.set_defaults(func=cmd_worker)

    jobs_parser = sub.add_parser("jobs", help="list, submit, follow and cancel worker jobs")
    jobs_parser.set_defaults(func=cmd_jobs, jobs_command=None, status=None, kind=None, limit=20)
    jsub = jobs_parser.add_subparsers(dest="jobs_command")
    listing = jsub.add_parser("list", help="recent jobs (default)")
    listing.add_argument("--status", choices=list(JOB_STATUSES))
    listing.add_argument("--kind", choices=list(JOB_KINDS))
    listing.add_argument("--limit", type=_positive, default=20, help="this many, newest first (default 20)")
    submit = jsub.add_parser(
        "submit", help="queue a job", epilog="params each kind takes: " + "; ".join(
            f"{kind}: {', '.join(sorted(JOB_PARAMS[kind]))}" for kind in JOB_KINDS))
    submit.add_argument("kind", choices=list(JOB_KINDS))
    submit.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="a job param (parsed as YAML), e.g. --set steps=200 --set lr=0.0003")
    submit.add_argument("--params", type=_json_object, help="job params as a JSON object")
    submit.add_argument("--max-attempts", type=_attempts,
                        help=f"runs before a job whose worker dies fails, 1-{MAX_ATTEMPTS} "
                             "(RETRIEVAL_JOB_MAX_ATTEMPTS, default 3)")
    submit.add_argument("--follow", action="store_true", help="then follow it until it finishes")
    submit.add_argument("--timeout", type=float)
    for name, text in (("show", "one job as JSON"), ("follow", "print progress until the job finishes"),
                       ("logs", "the job's log"), ("cancel", "cancel a queued job or stop a running one")):
        p = jsub.add_parser(name, help=text)
        p.add_argument("id", type=int)
        if name == "follow":
            p.add_argument("--timeout", type=float)
        if name == "logs":
            p.add_argument("--tail", type=_positive, default=200, help="the last N lines (default 200)")

    keys = sub.add_parser("keys", help="API keys: create (shown once), list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("name", help="who or what uses the key")
    create.add_argument("--scopes", type=_scopes, default="read", help="comma-separated: read, write (default: read)")
    keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", type=int)
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # FAISS logs each build it tried to load (AVX512, AVX2, generic), and Alembic each of its
        # plugins it set up: lines on every command that tell a user nothing
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupted:
        if getattr(args, "command", None) == "restore":  # app.backup.restore undoes itself, and notes how it went
            undone = " ".join(getattr(interrupted, "__notes__", [])) or "nothing had been written"
            print(f"retrieval restore: interrupted; {undone}", file=sys.stderr)
        else:
            print("retrieval: interrupted. What was committed stays, and the same command goes on from it where it "
                  "can (an index build from its last flushed shard).", file=sys.stderr)
        return 130
    except Exception as exc:
        said = None if args.verbose else _user_error(exc)
        if said is None:
            raise
        line, code = said
        print(f"retrieval: {line}", file=sys.stderr)
        return code


# Errors that are the user's to fix, said in one line (-v shows the traceback), exit 1: what was asked cannot be
# done (2: how the command was configured, as argparse's usage errors). By name: their modules load lazily
# (torch, faiss), and an error of a module never loaded cannot have been raised.
USER_ERRORS = {"models.embedder": "DeviceUnavailable", "app.indexing.sources": "SourceError",
               "index.builders": "FactoryError", "app.jobs": "JobError"}


def _user_error(exc: Exception) -> tuple[str, int] | None:
    """The one line to print for an error the user can fix and the exit status, or None for a bug (the traceback
    then shows)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.title == "Settings":  # a RETRIEVAL_* variable or .env line
        problems = "; ".join(f"RETRIEVAL_{'_'.join(str(p) for p in error['loc']).upper()}={error.get('input')!r}: "
                             f"{error['msg']}" for error in exc.errors())
        return f"invalid setting: {problems}", 2
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}", 1
    not_ready = _database_not_ready(exc)
    if not_ready is not None:
        return not_ready, 1
    for module_name, class_name in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, getattr(module, class_name)):
            if class_name == "DeviceUnavailable":
                return f"{exc} (RETRIEVAL_DEVICE, or --device where a command takes it)", 2
            return str(exc), 1
    return None


def _database_not_ready(exc: Exception) -> str | None:
    """The line for a command that met a database it cannot use as it is (app.db.session.database_problem tells,
    as it does for the service): one not set up, or behind the code's migrations, needs `retrieval db upgrade` (a
    missing table in a database at this code's revision is a bug, and its traceback shows); a server that could not
    be connected to is said as such."""
    from sqlalchemy.exc import DBAPIError

    from app.db.session import database_problem

    if not isinstance(exc, DBAPIError):
        return None
    url = get_settings().resolved_database_url  # read before the command could fail on it
    found = database_problem(exc, url)
    if found is None:
        return None
    problem, upgrade_fixes = found
    if not upgrade_fixes:  # not answering: only a failed connect (SQLite raises OperationalError for bad SQL too)
        return problem if exc.statement is None or exc.connection_invalidated else None
    return f"{problem}: run `retrieval db upgrade` first"


if __name__ == "__main__":
    sys.exit(main())
