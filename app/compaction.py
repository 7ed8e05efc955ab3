"""The service's maintenance loop: hot-swap a newly promoted version, and compact online changes.

Every `swap_poll_s` the loop looks for a new active version in SQL (deployment.check_for_new_version); then,
once `compact_every` online changes are pending or the oldest has waited `compact_after_s`, it publishes a
compacted version (app.indexing.compact: one replica at a time, decided in SQL) and swaps it in at once, reusing
the loaded model. Requests keep being served throughout: the compaction reads files and SQL, not the live index.
Every `malloc_trim_s` it also hands the memory malloc holds free back to the OS (app/memory.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime

from fastapi import FastAPI

from app.deployment import ServingState, check_for_new_version, converge_with_peers
from app.indexing.compact import compact_index
from app.memory import release_free_heap
from app.schemas import utc_timestamp
from app.settings import Settings

log = logging.getLogger(__name__)

OWNER = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def compaction_due(state: ServingState, settings: Settings, now: float | None = None) -> bool:
    if state.pending <= 0:
        return False
    if settings.compact_every > 0 and state.pending >= settings.compact_every:
        return True
    waited = (now if now is not None else time.monotonic()) - (state.pending_since or 0.0)
    return settings.compact_after_s > 0 and state.pending_since is not None and waited >= settings.compact_after_s


async def compact_now(app: FastAPI, settings: Settings) -> dict:
    """Publish a compacted version and swap it in. Returns what happened (also kept for /readyz)."""
    state: ServingState = app.state.serving
    report = await asyncio.to_thread(compact_index, settings, OWNER)
    outcome = {**asdict(report), "seconds": round(report.seconds, 3), "at": utc_timestamp(datetime.now(UTC))}
    state.last_compaction = outcome
    log.info("compaction: %s", report.message)
    if report.published:
        await check_for_new_version(app, settings)
    return outcome


async def maintain(app: FastAPI, settings: Settings) -> None:
    """Background task: poll SQL for a newly promoted version and hot-swap it in, else converge with the other
    replicas' writes; compact when due; every `malloc_trim_s` return malloc's free memory to the OS."""
    last_trim = time.monotonic()
    while True:
        await asyncio.sleep(settings.swap_poll_s)
        try:
            if not await check_for_new_version(app, settings):
                # The adds and deletes other replicas made (docs/scaling.md).
                await asyncio.to_thread(converge_with_peers, app, settings)
            if app.state.deployment is not None and compaction_due(app.state.serving, settings):
                await compact_now(app, settings)
            if settings.malloc_trim_s > 0 and time.monotonic() - last_trim >= settings.malloc_trim_s:
                await asyncio.to_thread(release_free_heap)
                last_trim = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. the database is briefly unreachable; try again next tick
            serving = app.state.deployment is not None
            if not app.state.serving.database_failed(exc, settings.resolved_database_url, serving=serving):
                log.exception("checking for a new active version or compacting failed")  # database ones: one line
