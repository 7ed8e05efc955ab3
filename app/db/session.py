"""Engine and session factory, one per database URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import normalize_database_url

CONNECT_TIMEOUT_S = 5


def get_engine(url: str) -> Engine:
    """The engine of `url` (`postgresql://` and `postgres://` use the installed psycopg2, as in the settings)."""
    return _engine(normalize_database_url(url))


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while the batch job or worker writes; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    # Bounded waits when the server is down or slow to hand out a connection: a request fails with 503 in
    # seconds instead of hanging; pre-ping replaces connections that died while the server was away.
    return create_engine(url, pool_pre_ping=True, pool_timeout=CONNECT_TIMEOUT_S,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def database_problem(exc: BaseException, url: str) -> tuple[str, bool] | None:
    """When `exc` is the database not being set up for this code (no SQLite file, no tables, or a revision behind:
    `retrieval db upgrade` not run) or not answering, one line saying so and whether `retrieval db upgrade` is the
    fix; None for anything else (a table missing from a database at this code's revision is a bug)."""
    if not isinstance(exc, DBAPIError):
        return None
    said = " ".join(str(exc.orig).split())
    where = make_url(url).render_as_string(hide_password=True)
    if _missing_table(exc):
        try:
            behind = schema_behind(url)
        except DBAPIError:
            return None
        return (behind, True) if behind is not None else None
    if url.startswith("sqlite") and "unable to open database file" in said:
        database = make_url(url).database
        if database and Path(database).exists():  # there and not opened: permissions, a folder in its place
            return f"the database at {where} cannot be opened ({said})", False
        return f"the database at {where} is not set up", True  # no file yet
    if isinstance(exc, OperationalError):
        return f"the database at {where} does not answer ({said})", False
    return None


def _missing_table(exc: DBAPIError) -> bool:
    return "no such table" in str(exc.orig) or getattr(exc.orig, "pgcode", None) == "42P01"  # undefined_table


def schema_behind(url: str) -> str | None:
    """None when the database is at this code's migration revision; else what it is instead (not set up, or at an
    older revision), the line `retrieval db upgrade` fixes. Raises what connecting raises. One SELECT, without
    Alembic's migration context (which logs at every call: /readyz asks)."""
    from app.db.migrate import head_revision

    where = make_url(url).render_as_string(hide_password=True)
    with get_engine(url).connect() as conn:
        try:
            revisions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        except DBAPIError as exc:
            if not _missing_table(exc):
                raise
            revisions = []
    head = head_revision()
    if head in revisions:
        return None
    if not revisions:
        return f"the database at {where} is not set up"
    return f"the database at {where} is at revision {', '.join(revisions)}, not this version's {head}"


def session_factory(url: str) -> sessionmaker[Session]:
    return _sessionmaker_for(get_engine(url))


@lru_cache(maxsize=8)
def _sessionmaker_for(engine: Engine) -> sessionmaker[Session]:
    """One per engine (made per request it showed in the service's profile), so it follows get_engine's cache."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
