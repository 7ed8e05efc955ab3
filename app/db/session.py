"""Engine and session factory, one per database URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
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
    """When `exc` is the database not being there (no SQLite file, no tables: `retrieval db upgrade` not run yet)
    or not answering, one line saying so and whether `retrieval db upgrade` is the fix; None for anything else."""
    if not isinstance(exc, DBAPIError):
        return None
    said = " ".join(str(exc.orig).split())
    where = make_url(url).render_as_string(hide_password=True)
    if "no such table" in said or getattr(exc.orig, "pgcode", None) == "42P01":  # 42P01: undefined_table
        first = str(exc.orig).strip().splitlines()[0]  # not PostgreSQL's LINE/caret lines under it
        return f"the database {where} has no tables yet ({first})", True
    if url.startswith("sqlite") and "unable to open database file" in said:
        return f"the database {where} does not exist yet ({said})", True
    if isinstance(exc, OperationalError):
        return f"the database {where} does not answer ({said})", False
    return None


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
