"""`retrieval`: the one command-line entry point (db, index, serve, demo, train, eval, worker, jobs)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app.settings import get_settings


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
    from app.indexing import EmptySource, build_index

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    try:
        report = build_index(settings, args.source, shard=args.shard, factory=args.factory,
                             progress=not args.no_progress)
    except (EmptySource, FileNotFoundError) as exc:
        print(f"retrieval index build: {exc}", file=sys.stderr)
        return 1
    if args.no_progress:  # with progress on, build_index has printed the summary under its bars
        print(report.summary())
    return 1 if report.added == 0 and report.failed and not report.total_indexed else 0


def cmd_index_verify(args: argparse.Namespace) -> int:
    from app.indexing import verify_index

    report = verify_index(get_settings())
    if report.ok:
        print(f"index {report.version}: SQL and index agree")
        return 0
    print(f"index {report.version}: {len(report.problems)} problem(s)", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def cmd_index_merge(args: argparse.Namespace) -> int:
    from app.indexing import merge_shards, rebuild_index

    settings = get_settings()
    if args.index_command == "rebuild":
        rebuild_index(settings, factory=args.factory, progress=not args.no_progress)
    else:
        merge_shards(settings, factory=args.factory, ondisk=args.ondisk, progress=not args.no_progress)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=args.workers,
                log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo index (once; re-runs add nothing) and serve it."""
    from app.db import migrate
    from app.demo import export_fashion_mnist
    from app.indexing import build_index

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    source = os.environ.get("RETRIEVAL_DEMO_SOURCE")
    if source:
        corpus = Path(source)
    else:
        corpus, queries = export_fashion_mnist(settings.data_dir, per_class=args.per_class)
        print(f"demo corpus: {corpus}\nheld-out query images: {queries}")
    build_index(settings, corpus, progress=True)
    if args.no_serve:
        return 0
    return cmd_serve(args)


PASS_THROUGH = {
    "train": "train an embedder from a YAML config (models.train; see configs/)",
    "eval": "Recall@K, MAP@R, R-precision of a preset or checkpoint on a dataset (models.evaluate)",
}


def _pass_through(command: str, argv: list[str]) -> int:
    if command == "train":
        from models.train import cli
    else:
        from models.evaluate import cli
    return int(cli(argv) or 0)


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
    build.add_argument("source", help="a folder (labels = sub-folder names) or a CSV manifest (path,label,...)")
    build.add_argument("--shard", type=_shard, help="i/n: embed only shard i of n")
    build.add_argument("--factory", help="FAISS factory string overriding the automatic choice")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=cmd_index_build)
    verify = index_sub.add_parser("verify", help="check SQL and the active index agree; non-zero exit if not")
    verify.set_defaults(func=cmd_index_verify)
    for name, text in (("merge", "after sharded builds: embed what is missing, build and publish one index"),
                       ("rebuild", "rebuild/retype the index from stored embeddings (compacts deletions)")):
        step = index_sub.add_parser(name, help=text)
        step.add_argument("--factory", help="FAISS factory string overriding the automatic choice")
        step.add_argument("--ondisk", action="store_true", help="IVF: merge per-shard lists on disk")
        step.add_argument("--no-progress", action="store_true")
        step.set_defaults(func=cmd_index_merge)

    def add_serve_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="bind address (RETRIEVAL_HOST, default 127.0.0.1)")
        p.add_argument("--port", type=int, help="port (RETRIEVAL_PORT, default 8000)")
        p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
        p.add_argument("--log-level", default="info")

    serve = sub.add_parser("serve", help="serve the REST API and the query page")
    add_serve_options(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="build a demo index from Fashion-MNIST (or RETRIEVAL_DEMO_SOURCE) and serve")
    add_serve_options(demo)
    demo.add_argument("--per-class", type=int, default=100, help="demo images per class")
    demo.add_argument("--no-serve", action="store_true", help="build the demo index and exit")
    demo.set_defaults(func=cmd_demo)

    for name, text in PASS_THROUGH.items():  # listed for --help; main() hands their argv to models/
        sub.add_parser(name, help=text, add_help=False)

    from app.worker import add_cli as add_worker_cli

    add_worker_cli(sub)  # `worker` and `jobs`
    from app.auth import add_cli as add_keys_cli

    add_keys_cli(sub)  # `keys`
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASS_THROUGH:  # `train` / `eval` parse their own options (models/)
        return _pass_through(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
