"""Shared request helpers: the deployment a request runs on, filters, embedding through the batcher, and
the search + SQL join every query ends with."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
from fastapi import Query, Request
from PIL import Image as PILImage
from sqlalchemy import String, cast, select
from sqlalchemy.sql import Select
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.batching import MicroBatcher
from app.db.models import Image
from app.db.session import session_scope
from app.deployment import Deployment
from app.errors import ApiError
from app.schemas import SearchHit
from app.settings import Settings

META_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
META_FILTER_DOC = ("Metadata filters, each `key=value` (repeat for AND); values match the text form of the stored "
                   "value, e.g. `color=red`, `year=2021`.")
LABEL_DOC = "Only images with exactly this label."
MIN_SCORE_DOC = "Drop results scoring below this cosine similarity (-1..1)."


def get_deployment(request: Request) -> Deployment:
    """The pair this request runs on, taken once: a hot swap during the request does not change it."""
    deployment = getattr(request.app.state, "deployment", None)
    if deployment is None:
        raise ApiError(503, "no index is active yet: build one with `retrieval index build SOURCE`",
                       code="not_ready", headers={"Retry-After": "30"})
    return deployment


def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


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


def filters_dep(
    label: str | None = Query(None, max_length=255, description=LABEL_DOC),
    meta: list[str] = Query([], description=META_FILTER_DOC),
) -> Filters:
    return Filters(label=label, meta=parse_meta_filters(meta))


def allowed_ids(settings: Settings, filters: Filters) -> np.ndarray:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(filters.apply(select(Image.id)))
        return np.fromiter(rows, dtype=np.int64)


def hits_for(settings: Settings, scores: np.ndarray, ids: np.ndarray) -> list[SearchHit]:
    """Join index hits with their rows, keeping rank order and dropping ids that are deleted or unknown."""
    wanted = [int(i) for i in ids if i >= 0]
    if not wanted:
        return []
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(Image).where(Image.id.in_(wanted), Image.deleted_at.is_(None))).all()
        by_id = {row.id: row for row in rows}
        return [
            SearchHit(id=i, score=float(s), uri=by_id[i].uri, label=by_id[i].label, metadata=by_id[i].meta or {})
            for s, i in zip(scores.tolist(), ids.tolist(), strict=True)
            if i in by_id
        ]


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


async def embed_query(request: Request, deployment: Deployment, image: PILImage.Image,
                      clock: StageClock) -> np.ndarray:
    t = time.perf_counter()
    pixels = await run_in_threadpool(deployment.preprocess, image)
    t = clock.record("preprocess", t)
    vector = await get_batcher(request).embed(deployment, pixels)
    clock.ms["forward"] = (time.perf_counter() - t) * 1000  # queue wait + forward; the batcher observes each
    return vector


async def search_and_join(settings: Settings, deployment: Deployment, vector: np.ndarray, k: int,
                          filters: Filters, min_score: float | None, clock: StageClock,
                          exclude: list[int] | None = None) -> list[SearchHit]:
    """Top-k live images for `vector`: filtered in SQL first (an IDSelector in FAISS), joined with SQL after.

    Rows deleted by another process between index and SQL are dropped and the search repeats without them,
    so k results come back whenever k live matches exist.
    """
    allowed = None
    if filters.active:
        t = time.perf_counter()
        allowed = await run_in_threadpool(allowed_ids, settings, filters)
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
        hits = await run_in_threadpool(hits_for, settings, scores[0], ids[0])
        clock.record("metadata", t)
        found = [int(i) for i in ids[0] if i >= 0]
        dropped = set(found) - {h.id for h in hits}
        if not dropped:
            break
        excluded.extend(dropped)
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return hits[:k]
