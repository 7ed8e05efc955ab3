"""API keys: sent in the `X-API-Key` header, stored as SHA-256 hashes, with 'read' and 'write' scopes.

With `auth_enabled` off (the default, for a local demo) nothing is checked. With it on, writes need a key
with the 'write' scope; reads need one with 'read' unless `open_reads` leaves them open. A key may hold
both scopes ("read,write"). Keys are random 256-bit tokens, so a plain SHA-256 is the right hash (no salt
or slow KDF needed: there is nothing to brute-force). Lookups are cached for `auth_cache_s` seconds.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from fastapi import Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.db.models import ApiKey
from app.db.session import session_scope
from app.errors import ApiError

SCOPES = ("read", "write")
KEY_PREFIX = "rk_"

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="An API key; see `retrieval keys create`.")


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def parse_scopes(text: str) -> set[str]:
    scopes = {s.strip() for s in text.split(",") if s.strip()}
    unknown = scopes - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be a comma-separated subset of {SCOPES}; got {text!r}")
    return scopes


def create_api_key(url: str, name: str, scopes: str) -> tuple[int, str]:
    """Create a key; returns (id, plain key). The plain key is not stored anywhere: show it once."""
    wanted = parse_scopes(scopes)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    with session_scope(url) as session:
        row = ApiKey(name=name, key_hash=hash_key(plain), scopes=",".join(s for s in SCOPES if s in wanted))
        session.add(row)
        session.flush()
        return row.id, plain


def revoke_api_key(url: str, key_id: int) -> bool:
    with session_scope(url) as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = datetime.now(UTC)
    _cache.clear()
    return True


class _KeyCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str, ttl: float) -> tuple[bool, frozenset[str] | None]:
        with self._lock:
            entry = self._entries.get(key_hash)
        if entry is None or time.monotonic() - entry[0] > ttl:
            return False, None
        return True, entry[1]

    def put(self, key_hash: str, scopes: frozenset[str] | None) -> None:
        with self._lock:
            if len(self._entries) > 10_000:  # unknown keys are cached too: bound what a scanner can fill
                self._entries.clear()
            self._entries[key_hash] = (time.monotonic(), scopes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _KeyCache()


def _lookup(url: str, key_hash: str) -> frozenset[str] | None:
    with session_scope(url) as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
        return None if row is None else frozenset(s.strip() for s in row.scopes.split(","))


async def scopes_for(request: Request, plain: str) -> frozenset[str] | None:
    settings = request.app.state.settings
    key_hash = hash_key(plain)
    hit, scopes = _cache.get(key_hash, settings.auth_cache_s)
    if not hit:
        scopes = await run_in_threadpool(_lookup, settings.resolved_database_url, key_hash)
        _cache.put(key_hash, scopes)
    return scopes


def require(scope: str) -> Callable[..., Awaitable[None]]:
    """A dependency: the request must carry a key with `scope` (unless auth is off, or reads are open)."""

    async def check(request: Request, api_key: str | None = Security(api_key_header)) -> None:
        settings = request.app.state.settings
        if not settings.auth_enabled or (scope == "read" and settings.open_reads):
            return
        if not api_key:
            raise ApiError(401, "an API key is required: send it in the X-API-Key header",
                           headers={"WWW-Authenticate": "ApiKey"})
        scopes = await scopes_for(request, api_key)
        if scopes is None:
            raise ApiError(401, "the API key is unknown or revoked", headers={"WWW-Authenticate": "ApiKey"})
        if scope not in scopes:
            raise ApiError(403, f"the API key lacks the '{scope}' scope (it has: {', '.join(sorted(scopes))})")

    return check


require_read = require("read")
require_write = require("write")
