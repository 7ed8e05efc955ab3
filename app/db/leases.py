"""Named, expiring locks in SQL: one holder at a time, across processes and machines.

Taking a lease is one conditional UPDATE (`WHERE name = :n AND (expired OR owner = :me)`), atomic on SQLite
(one writer) and PostgreSQL (the row lock, then the condition re-checked); the first taker of a name inserts
its row, and a concurrent insert loses on the primary key. A holder that dies lets the lease expire.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from app.db.models import Lease
from app.db.session import get_engine


def acquire(url: str, name: str, owner: str, ttl_s: float) -> bool:
    """Take (or extend) lease `name` for `ttl_s` seconds. False when someone else holds it."""
    now = datetime.now(UTC)
    until = now + timedelta(seconds=ttl_s)
    engine = get_engine(url)
    with engine.begin() as conn:
        taken = conn.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.expires_at.is_(None), Lease.expires_at < now, Lease.owner == owner))
            .values(owner=owner, expires_at=until)
        ).rowcount
    if taken:
        return True
    try:
        with engine.begin() as conn:
            conn.execute(insert(Lease).values(name=name, owner=owner, expires_at=until))
    except IntegrityError:  # the row exists and someone else holds it
        return False
    return True


def release(url: str, name: str, owner: str) -> None:
    """Give the lease back if we still hold it."""
    with get_engine(url).begin() as conn:
        conn.execute(update(Lease).where(Lease.name == name, Lease.owner == owner)
                     .values(owner=None, expires_at=None))


def holder(url: str, name: str) -> tuple[str, datetime] | None:
    """Who holds lease `name` now and until when (UTC), or None when nobody does."""
    with get_engine(url).connect() as conn:
        row = conn.execute(select(Lease.owner, Lease.expires_at).where(Lease.name == name)).first()
    if row is None or row.owner is None or row.expires_at is None:
        return None
    until = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)  # SQLite: naive UTC
    return (row.owner, until) if until > datetime.now(UTC) else None


@contextmanager
def holding(url: str, name: str, owner: str, ttl_s: float, wait_s: float = 0.0,
            on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold lease `name` for the block, waiting up to `wait_s` for it (`on_wait` is called once when it must
    wait); yields whether it was taken (when not, the block runs holding nothing, and says what to do)."""
    deadline = time.monotonic() + wait_s
    taken = acquire(url, name, owner, ttl_s)
    if not taken and wait_s > 0 and on_wait is not None:
        on_wait()
    while not taken and time.monotonic() < deadline:
        time.sleep(0.5)
        taken = acquire(url, name, owner, ttl_s)
    try:
        yield taken
    finally:
        if taken:
            release(url, name, owner)
