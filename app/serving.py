"""The query pipeline every search runs: embed the query image (through the micro-batcher), filter in SQL, search
the index, join the hits with their rows. Routes (app/api/) parse the request and call these.

SQL work takes the request's session (app.api.deps.get_session) and runs in the threadpool, one step at a
time, so the event loop never waits on the database.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import String, cast, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.batching import MicroBatcher
from app.db.models import Image
from app.deployment import Deployment
from app.errors import ApiError
from app.schemas import SearchHit, Timings

META_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class Filters:
    label: str | None = None
    meta: list[tuple[str, str]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.label is not None or bool(self.meta)

    def apply(self, query: Select) -> Select:
        query = query.where(Image.deleted_at.is_(None))
        if self.label is not None:
            query = query.where(Image.label == self.label)
        for key, value in self.meta:
            # The text form of the JSON value: ->> on PostgreSQL, CAST(json_extract) on SQLite.
            query = query.where(cast(Image.meta[key].as_string(), String) == value)
        return query


def parse_meta_filters(items: list[str]) -> list[tuple[str, str]]:
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not META_KEY.match(key):
            raise ApiError(422, f"metadata filter {item!r} must look like key=value, the key made of letters, "
                                "digits, '_', '.', '-' (at most 64)")
        parsed.append((key, value))
    return parsed


@dataclass
class StageClock:
    """Per-request stage timings (ms) that also feed the Prometheus stage histograms."""

    started: float = field(default_factory=time.perf_counter)
    ms: dict[str, float] = field(default_factory=dict)

    def record(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - since) * 1000
        if stage in metrics.STAGES:
            metrics.STAGE_SECONDS.labels(stage).observe(now - since)
        return now

    def total(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def timings(self) -> Timings:
        ms = {k: round(v, 2) for k, v in self.ms.items()}
        return Timings(decode_ms=ms.get("decode", 0.0), preprocess_ms=ms.get("preprocess", 0.0),
                       forward_ms=ms.get("forward", 0.0),
                       embed_ms=round(ms.get("preprocess", 0.0) + ms.get("forward", 0.0), 2),
                       search_ms=ms.get("search", 0.0), metadata_ms=ms.get("metadata", 0.0),
                       total_ms=round(self.total(), 2))


def allowed_ids(session: Session, filters: Filters) -> np.ndarray:
    return np.fromiter(session.scalars(filters.apply(select(Image.id))), dtype=np.int64)


def hits_for(session: Session, scores: np.ndarray, ids: np.ndarray) -> list[SearchHit]:
    """Join index hits with their rows, keeping rank order and dropping ids that are deleted or unknown."""
    wanted = [int(i) for i in ids if i >= 0]
    if not wanted:
        return []
    rows = session.scalars(select(Image).where(Image.id.in_(wanted), Image.deleted_at.is_(None))).all()
    by_id = {row.id: row for row in rows}
    return [
        SearchHit(id=i, score=float(s), uri=by_id[i].uri, label=by_id[i].label, metadata=by_id[i].meta or {})
        for s, i in zip(scores.tolist(), ids.tolist(), strict=True)
        if i in by_id
    ]


async def embed_query(batcher: MicroBatcher, deployment: Deployment, image: PILImage.Image,
                      clock: StageClock) -> np.ndarray:
    t = time.perf_counter()
    pixels = await run_in_threadpool(deployment.preprocess, image)
    t = clock.record("preprocess", t)
    vector = await batcher.embed(deployment, pixels)
    clock.ms["forward"] = (time.perf_counter() - t) * 1000  # queue wait + forward; the batcher observes each
    return vector


async def search_and_join(session: Session, deployment: Deployment, vector: np.ndarray, k: int,
                          filters: Filters, min_score: float | None, clock: StageClock,
                          exclude: list[int] | None = None) -> list[SearchHit]:
    """Top-k live images for `vector`: filtered in SQL first (an IDSelector in FAISS), joined with SQL after.

    Rows deleted by another process between index and SQL are dropped and the search repeats without them,
    so k results come back whenever k live matches exist.
    """
    allowed = None
    if filters.active:
        t = time.perf_counter()
        allowed = await run_in_threadpool(allowed_ids, session, filters)
        clock.record("metadata", t)
        if len(allowed) == 0:
            return []
    excluded = list(exclude or [])
    queries = vector[None, :].astype(np.float32)
    hits: list[SearchHit] = []
    for _ in range(3):
        t = time.perf_counter()
        exclude_ids = np.asarray(excluded, dtype=np.int64) if excluded else None
        scores, ids = await run_in_threadpool(deployment.search, queries, k, allowed, exclude_ids)
        t = clock.record("search", t)
        hits = await run_in_threadpool(hits_for, session, scores[0], ids[0])
        clock.record("metadata", t)
        found = [int(i) for i in ids[0] if i >= 0]
        dropped = set(found) - {h.id for h in hits}
        if not dropped:
            break
        excluded.extend(dropped)
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return hits[:k]


async def search_by_image(session: Session, batcher: MicroBatcher, deployment: Deployment,
                          image: PILImage.Image, k: int, filters: Filters, min_score: float | None,
                          clock: StageClock) -> list[SearchHit]:
    """Embed `image` and return its top-k live neighbours (the whole pipeline of POST /v1/search)."""
    vector = await embed_query(batcher, deployment, image, clock)
    return await search_and_join(session, deployment, vector, k, filters, min_score, clock)
