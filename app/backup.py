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

A restore checks what it can before writing anything (the rows fit the target database: PostgreSQL refuses a
label over 255 characters that SQLite stored; the data dir and the database are empty), and a restore that fails
later undoes what it did (the rows, the migrations it ran, the files and folders it made), so it can be retried.
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

from sqlalchemy import DateTime, Engine, Integer, String, Table, create_engine, delete, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

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
# What an empty data dir may hold: the SQLite file (`retrieval db upgrade` ran first), hidden entries (the image's
# /data/.cache), the image's /data/tmp (TMPDIR) and a fresh file system's lost+found.
IGNORED_IN_DATA_DIR = ("tmp", "lost+found")
INT32 = (-(2**31), 2**31 - 1)
INSERT_CHUNK = 5000


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


def _one_line(exc: BaseException) -> str:
    """A database or OS error in one line: the driver's message (PostgreSQL's DETAIL included) and its class."""
    inner = getattr(exc, "orig", None) or exc
    return f"{' '.join(str(inner).split())} ({inner.__class__.__name__})"


def _first_few(items: list[str], shown: int = 3) -> str:
    return "; ".join(items[:shown]) + (f"; and {len(items) - shown} more" if len(items) > shown else "")


def _row_name(table: Table, row: dict[str, Any]) -> str:
    return f"{table.name} row " + ", ".join(f"{c.name}={row.get(c.name)!r}" for c in table.primary_key.columns)


def _read_backup(source: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    manifest_path = source / "manifest.json"
    if not manifest_path.is_file():
        raise BackupError(f"{source} is not a backup (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{source} has format {manifest.get('format')!r}; this version reads {FORMAT}")
    tables = json.loads((source / "database.json").read_text())
    # A backup made before leases were left out holds the backup's own compaction lease: never restore it.
    return manifest, {name: rows for name, rows in tables.items() if name not in PER_PROCESS_TABLES}


def _prepare_rows(tables: dict[str, list[dict[str, Any]]], old_root: str, data_dir: Path) -> None:
    """In place: datetimes back from ISO 8601, stored paths moved from the old data dir to the new one."""
    for table in _data_tables():
        dates = [c.name for c in table.columns if isinstance(c.type, DateTime)]
        for row in tables.get(table.name, []):
            for name in dates:
                if isinstance(row.get(name), str):
                    row[name] = datetime.fromisoformat(row[name])
            for name in PATH_COLUMNS.get(table.name, ()):
                row[name] = _rewrite(row[name], old_root, data_dir)


def _refused_values(tables: dict[str, list[dict[str, Any]]], dialect: str) -> list[str]:
    """Values the target database refuses although the backup's database held them: SQLite enforces no VARCHAR
    length and takes 64-bit integers and NUL characters in text; PostgreSQL takes none of these."""
    if dialect != "postgresql":
        return []
    problems = []
    for table in _data_tables():
        for row in tables.get(table.name, []):
            for column in table.columns:
                value, kind = row.get(column.name), column.type
                length = getattr(kind, "length", None)
                if isinstance(value, str) and isinstance(kind, String) and length and len(value) > length:
                    hint = (f" (PATCH /v1/images/{row.get('id')} sets a shorter one)"
                            if (table.name, column.name) == ("images", "label") else "")
                    problems.append(f"{_row_name(table, row)}: {column.name} is {len(value)} characters, "
                                    f"PostgreSQL's {table.name}.{column.name} holds at most {length}{hint}")
                elif isinstance(value, str) and "\x00" in value:
                    problems.append(f"{_row_name(table, row)}: {column.name} holds a NUL character, which "
                                    "PostgreSQL text cannot")
                elif (isinstance(value, int) and not isinstance(value, bool) and isinstance(kind, Integer)
                      and not INT32[0] <= value <= INT32[1]):
                    problems.append(f"{_row_name(table, row)}: {column.name} {value} is outside PostgreSQL's "
                                    "integer range")
    return problems


def _not_empty(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir()
                  if not (p.name.startswith(("retrieval.db", ".")) or p.name in IGNORED_IN_DATA_DIR))


class _Undo:
    """What a restore changed, to take back when it fails: the rows it committed, the migrations it ran, a SQLite
    file it created, and the data dir's new entries (the whole folder when it made it)."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url, self.data_dir = url, data_dir
        self.made = data_dir
        while not self.made.parent.exists():  # the topmost folder the restore will make
            self.made = self.made.parent
        self.found = {p.name for p in data_dir.iterdir()} if data_dir.exists() else None
        database = make_url(url).database if url.startswith("sqlite") else None
        self.sqlite_file = Path(database).resolve() if database and database != ":memory:" else None
        self.sqlite_existed = self.sqlite_file is not None and self.sqlite_file.exists()
        self.revision_before: str | None = None
        self.migrated = self.rows_committed = False

    def run(self) -> str:
        """Undo; says in a few words what state it left."""
        problems = []
        try:
            self._database()
        except Exception as exc:  # noqa: BLE001 - said in the one line, with what to clear by hand
            problems.append(f"the database ({_one_line(exc)})")
        get_engine(self.url).dispose()  # no pooled connection keeps a removed SQLite file open
        try:
            self._files()
        except OSError as exc:
            problems.append(f"the data dir ({_one_line(exc)})")
        if problems:
            return (f"undoing it failed for {' and '.join(problems)}: empty them by hand before restoring again")
        return "nothing was kept (the data dir and the database are as they were): fix that and restore again"

    def _database(self) -> None:
        if self.sqlite_file is not None and not self.sqlite_existed:
            return  # the file is removed with the data dir's new entries
        engine = get_engine(self.url)
        if self.rows_committed:  # the database was empty before: every row is the restore's
            with engine.begin() as conn:
                present = set(inspect(conn).get_table_names())
                for table in reversed(_data_tables()):
                    if table.name in present:
                        conn.execute(delete(table))
        if self.migrated and migrate.current(self.url) != self.revision_before:
            migrate.downgrade(self.url, self.revision_before or "base")

    def _files(self) -> None:
        if self.found is None:
            if self.made.exists():
                shutil.rmtree(self.made)
        else:
            for path in self.data_dir.iterdir():
                kept_database = self.sqlite_existed and path.name.startswith(self.sqlite_file.name)
                if path.name in self.found or kept_database:
                    continue
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if self.sqlite_file is not None and not self.sqlite_existed:
            for suffix in ("", "-wal", "-shm", "-journal"):
                self.sqlite_file.with_name(self.sqlite_file.name + suffix).unlink(missing_ok=True)


def restore(settings: Settings, source: Path) -> dict[str, Any]:
    """Restore the snapshot in `source` into the (empty) data dir and (empty) database of `settings`; a restore
    that fails leaves both as it found them, and says what failed in one line (BackupError)."""
    source = Path(source)
    manifest, tables = _read_backup(source)
    data_dir = settings.data_dir.resolve()
    url = settings.resolved_database_url
    _prepare_rows(tables, manifest["data_dir"], data_dir)
    refused = _refused_values(tables, make_url(url).get_backend_name())
    if refused:
        raise BackupError(
            f"the backup holds {len(refused)} value{'s' if len(refused) > 1 else ''} that PostgreSQL refuses "
            f"(SQLite stored them without complaint): {_first_few(refused)}. Nothing was written; change them in "
            "the original instance and back up again, or restore into SQLite")
    if data_dir.exists() and (extra := _not_empty(data_dir)):
        raise BackupError(f"the data dir {data_dir} is not empty ({', '.join(extra[:5])}"
                          f"{', ...' if len(extra) > 5 else ''}); restore into an empty one")
    undo = _Undo(url, data_dir)
    try:
        return _restore(source, manifest, tables, url, data_dir, undo)
    except BaseException as exc:
        undone = undo.run()
        if isinstance(exc, BackupError) and not undo.migrated:
            raise  # refused before changing anything (a database that is not empty)
        if isinstance(exc, BackupError):
            raise BackupError(f"{exc}; {undone}") from exc
        if isinstance(exc, (DBAPIError, OSError)):
            raise BackupError(f"restore failed: {_one_line(exc)}; {undone}") from exc
        exc.add_note(undone)  # Ctrl-C, or a bug: what the undo did is said with it (the CLI prints it)
        raise


def _restore(source: Path, manifest: dict[str, Any], tables: dict[str, list[dict[str, Any]]], url: str,
             data_dir: Path, undo: _Undo) -> dict[str, Any]:
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = get_engine(url)
    undo.revision_before = migrate.current(url)
    with engine.connect() as conn:
        present = set(inspect(conn).get_table_names())
        for table in _data_tables():
            if table.name in present and conn.execute(select(table).limit(1)).first() is not None:
                raise BackupError(f"the database is not empty (table {table.name} has rows); restore into an "
                                  "empty one")
    undo.migrated = True
    migrate.upgrade(url, manifest["revision"] or "head")
    copied = _copy_tree(source / "files", data_dir)  # files first: rows then name only files that exist
    _insert_rows(engine, tables, data_dir)
    undo.rows_committed = True
    migrate.upgrade(url)
    return {"files": copied, "rows": {name: len(rows) for name, rows in tables.items()},
            "models": len(tables.get(ModelVersion.__tablename__, []))}


class _Refused(Exception):
    def __init__(self, table: Table) -> None:
        self.table = table


def _insert_rows(engine: Engine, tables: dict[str, list[dict[str, Any]]], data_dir: Path) -> None:
    """Every row in one transaction; when the database refuses one, BackupError names it and says why."""
    try:
        with engine.begin() as conn:
            present = set(inspect(conn).get_table_names())
            for table in _data_tables():
                rows = tables.get(table.name, [])
                if rows and table.name not in present:
                    raise BackupError(f"the backup has rows for table {table.name}, which the database lacks")
                for start in range(0, len(rows), INSERT_CHUNK):
                    try:
                        conn.execute(insert(table), rows[start:start + INSERT_CHUNK])
                    except Exception as exc:
                        raise _Refused(table) from exc
            if engine.dialect.name == "postgresql":  # ids were inserted explicitly: move the sequences past them
                for table in _data_tables():
                    if "id" in table.columns and table.c.id.autoincrement is True:
                        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                          f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"))
            # Versions whose files were not in the backup cannot be served again.
            kept = {str(p) for p in (data_dir / "indexes").iterdir()} if (data_dir / "indexes").is_dir() else set()
            conn.execute(IndexVersion.__table__.update().where(IndexVersion.status != "active",
                                                               IndexVersion.path.not_in(kept or {""}))
                         .values(status="retired"))
    except _Refused as refused:
        cause = refused.__cause__
        found = _first_refused_row(engine, tables, refused.table)
        if found is None:  # only the batch failed (e.g. the connection): say what the driver said
            raise BackupError(f"restoring table {refused.table.name} failed: {_one_line(cause)}") from cause
        row, exc = found
        raise BackupError(f"the database refused {_row_name(refused.table, row)}: {_one_line(exc)}") from exc


def _first_refused_row(engine: Engine, tables: dict[str, list[dict[str, Any]]],
                       failed: Table) -> tuple[dict[str, Any], Exception] | None:
    """The first row of `failed` the database refuses, and why: the tables before it in bulk, then its rows one
    at a time, in a transaction rolled back whatever happens (only after a failed restore, to name the row)."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            for table in _data_tables():
                rows = tables.get(table.name, [])
                if table is not failed:
                    if rows:
                        conn.execute(insert(table), rows)
                    continue
                for row in rows:
                    try:
                        conn.execute(insert(table), [row])
                    except Exception as exc:  # noqa: BLE001 - the refusal we are looking for
                        return row, exc
                return None
        except Exception:  # noqa: BLE001 - an earlier table failing here too: nothing more precise to say
            return None
        finally:
            transaction.rollback()
    return None
