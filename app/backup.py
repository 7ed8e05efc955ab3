"""`retrieval backup DIR` and `retrieval restore DIR`: a consistent snapshot of SQL and the data directory,
taken while the service serves, and restored into an empty data directory and database.

Consistency comes from the order: SQL first, as one snapshot (PostgreSQL: a REPEATABLE READ transaction over
every table; SQLite: the online backup API copies the file, then it is read like any database), then the files.
Every file a snapshot row can name is immutable once written under its final name (images are named by their
sha256, embedding shards and index versions are written under a temporary name and renamed), and nothing the
service or a build writes later is named by the snapshot, so copying after it is safe. Files still being written
(dot-prefixed temporary names) are skipped.

    DIR/manifest.json      format, alembic revision, the source data dir, counts
    DIR/database.json      every table's rows but the leases' (JSON; datetimes as ISO 8601)
    DIR/files/...          images/, embeddings/, the model versions' checkpoints, the active index version

Paths stored in SQL are absolute; restore rewrites the old data dir prefix to the new one. Images registered by a
batch build from a folder outside the data dir are referenced, not copied (their uri keeps pointing there).

Leases (app/db/leases.py) belong to running processes, not to the data: the backup holds the compaction lease
while it takes the snapshot, so a copied row would lock the restored instance out of compacting (and its backups)
until it expired. They are neither backed up nor restored (a backup made before that still lists them: skipped).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sqlite3
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, Table, create_engine, insert, select, text

from app.db import leases, migrate
from app.db.models import Base, IndexVersion, ModelVersion
from app.db.session import get_engine
from app.indexing.compact import LEASE, LEASE_TTL_S
from app.settings import Settings
from index import versions

log = logging.getLogger(__name__)

FORMAT = "retrieval-backup/1"
PATH_COLUMNS = {"images": ("uri",), "model_versions": ("path",), "index_versions": ("path",)}
COPIED_DIRS = ("images", "embeddings")
# Rows of running processes (locks), not data: not backed up, skipped when an older backup has them.
PER_PROCESS_TABLES = frozenset({"leases"})


class BackupError(RuntimeError):
    """A backup or restore that cannot proceed; the message says why."""


def _data_tables() -> list[Table]:
    """The tables a backup holds, parents before children."""
    return [t for t in Base.metadata.sorted_tables if t.name not in PER_PROCESS_TABLES]


def _dump_tables(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    tables: dict[str, list[dict[str, Any]]] = {}
    options = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
    with engine.connect().execution_options(**options) as conn, conn.begin():
        for table in _data_tables():
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).mappings().all()
            tables[table.name] = [{k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
                                  for row in rows]
    return tables


def _sql_snapshot(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    url = settings.resolved_database_url
    if get_engine(url).dialect.name != "sqlite":
        return _dump_tables(get_engine(url))
    source = url.split("///", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "snapshot.db"
        with sqlite3.connect(source) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)  # a consistent copy while other connections write
        engine = create_engine(f"sqlite:///{copy}")
        try:
            return _dump_tables(engine)
        finally:
            engine.dispose()


def _copy_tree(source: Path, target: Path, vanished: list[Path] | None = None) -> int:
    """Copy the completed files under `source` (hard links when on one filesystem); skip temporary names and
    files already there. A file deleted while copying is listed in `vanished` when given (else an error)."""
    count = 0
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            src = Path(root) / name
            dst = target / src.relative_to(source)
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                versions.link_or_copy(src, dst)
            except FileNotFoundError:
                if vanished is None:
                    raise
                vanished.append(src)
                continue
            count += 1
    return count


def _copy_live_dir(source: Path, target: Path, attempts: int = 5) -> int:
    """Copy a directory the service keeps writing: a compaction may fold embedding shards (deleting them once
    their merged shard is committed) while we copy, so copy again until a pass sees nothing vanish; the merged
    shard, written before the deletions, is then in the copy."""
    copied = 0
    for _ in range(attempts):
        vanished: list[Path] = []
        copied += _copy_tree(source, target, vanished)
        if not vanished:
            return copied
    raise BackupError(f"files under {source} kept disappearing while copying ({vanished[0]}, ...); retry")


def _inside(path: str, root: Path) -> Path | None:
    try:
        return Path(path).resolve().relative_to(root)
    except ValueError:
        return None


def _copy_dirs(data_dir: Path, files: Path, names: list[str]) -> int:
    return sum(_copy_live_dir(data_dir / d, files / d) for d in names if (data_dir / d).is_dir())


def backup(settings: Settings, target: Path) -> dict[str, Any]:
    """Write a snapshot to `target` (which must not exist yet); it appears there only once complete."""
    target = Path(target)
    if target.exists():
        raise BackupError(f"{target} already exists; back up into a new directory")
    data_dir = settings.data_dir.resolve()
    url = settings.resolved_database_url
    revision = migrate.current(url)
    work = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    files = work / "files"
    files.mkdir(parents=True)
    try:
        # The SQL snapshot and the embeddings copy under the compaction lease: a fold in between could drop the
        # vector of an image deleted after the snapshot, which the restored database says is live.
        # Images only gain files after the snapshot (extra files are harmless), so they are copied after the lease.
        owner = f"backup-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

        def say_waiting() -> None:
            held = leases.holder(url, LEASE)
            by = f" by {held[0]} until {held[1]:%Y-%m-%d %H:%M:%S} UTC" if held else ""
            log.warning("the compaction lease is held%s (a compaction, an index build or another backup): "
                        "waiting for it, up to %.0f s", by, LEASE_TTL_S)

        with leases.holding(url, LEASE, owner, LEASE_TTL_S, wait_s=LEASE_TTL_S, on_wait=say_waiting) as taken:
            if not taken:
                held = leases.holder(url, LEASE)
                raise BackupError(f"the compaction lease is still held{f' by {held[0]}' if held else ''} after "
                                  f"{LEASE_TTL_S:.0f} s; retry the backup once it is free")
            tables = _sql_snapshot(settings)
            copied = _copy_dirs(data_dir, files, ["embeddings"])
        copied += _copy_dirs(data_dir, files, [d for d in COPIED_DIRS if d != "embeddings"])
        version_rows = tables["model_versions"] + [r for r in tables["index_versions"] if r["status"] == "active"]
        for row in version_rows:
            relative = _inside(row["path"], data_dir)
            if relative is None:
                raise BackupError(f"{row['name']} lives outside the data dir ({row['path']}); cannot back it up")
            if not (data_dir / relative).is_dir():
                if row in tables["model_versions"] and row["status"] != "active":
                    continue  # a retired model whose files were removed: its row is history only
                raise BackupError(f"{row['name']}: {data_dir / relative} is missing (pruned meanwhile?); retry")
            copied += _copy_tree(data_dir / relative, files / relative)
        (work / "database.json").write_text(json.dumps(tables))
        manifest = {"format": FORMAT, "revision": revision, "data_dir": str(data_dir), "files": copied,
                    "rows": {name: len(rows) for name, rows in tables.items()}}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _rewrite(value: str, old_root: str, new_root: Path) -> str:
    relative = _inside(value, Path(old_root))
    return str(new_root / relative) if relative is not None else value


def restore(settings: Settings, source: Path) -> dict[str, Any]:
    """Restore the snapshot in `source` into the (empty) data dir and (empty) database of `settings`."""
    source = Path(source)
    manifest_path = source / "manifest.json"
    if not manifest_path.is_file():
        raise BackupError(f"{source} is not a backup (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{source} has format {manifest.get('format')!r}; this version reads {FORMAT}")
    data_dir = settings.data_dir.resolve()
    if data_dir.exists() and any(not p.name.startswith("retrieval.db") for p in data_dir.iterdir()):
        raise BackupError(f"the data dir {data_dir} is not empty; restore into an empty one")
    data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    migrate.upgrade(url, manifest["revision"] or "head")
    engine = get_engine(url)
    with engine.connect() as conn:
        for table in _data_tables():
            if conn.execute(select(table).limit(1)).first() is not None:
                raise BackupError(f"the database is not empty (table {table.name} has rows); restore into an "
                                  "empty one")
    tables = json.loads((source / "database.json").read_text())
    # A backup made before leases were left out holds the backup's own compaction lease: never restore it.
    tables = {name: rows for name, rows in tables.items() if name not in PER_PROCESS_TABLES}
    copied = _copy_tree(source / "files", data_dir)  # files first: rows then name only files that exist
    with engine.begin() as conn:
        for table in _data_tables():
            rows = tables.get(table.name, [])
            dates = [c.name for c in table.columns if isinstance(c.type, DateTime)]
            for row in rows:
                for name in dates:
                    if row.get(name) is not None:
                        row[name] = datetime.fromisoformat(row[name])
                for name in PATH_COLUMNS.get(table.name, ()):
                    row[name] = _rewrite(row[name], manifest["data_dir"], data_dir)
            if rows:
                conn.execute(insert(table), rows)
        if engine.dialect.name == "postgresql":  # ids were inserted explicitly: move the sequences past them
            for table in Base.metadata.sorted_tables:
                if "id" in table.columns and table.c.id.autoincrement is True:
                    conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                      f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"))
        # Versions whose files were not in the backup cannot be served again.
        kept = {str(p) for p in (data_dir / "indexes").iterdir()} if (data_dir / "indexes").is_dir() else set()
        conn.execute(IndexVersion.__table__.update().where(IndexVersion.status != "active",
                                                           IndexVersion.path.not_in(kept or {""}))
                     .values(status="retired"))
    migrate.upgrade(url)
    return {"files": copied, "rows": {name: len(rows) for name, rows in tables.items()},
            "models": len(tables.get(ModelVersion.__tablename__, []))}
