"""The query pipeline every search runs: decode and preprocess the query image, embed it (through the
micro-batcher), filter in SQL, search the index, join the hits with their rows. Routes (app/api/) parse the
request and call these.

Each CPU or SQL step runs in the threadpool, so the event loop never waits on it, in as few hops as the pipeline
allows (decode + preprocess in one, filter + search + join in another): on a 2-core machine every hop is a
thread switch that the forward pass pays for. SQL work takes the request's session (app.api.deps.get_session).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.batching import MicroBatcher
from app.db.models import Image
from app.db.queries import meta_matches
from app.deployment import Deployment
from app.errors import ApiError
from app.images import decode_image
from app.ranking import POOL_FACTOR, POOL_MAX, Ranking, crowd, mmr_order
from app.region import Box, crop
from app.schemas import SearchHit, Timings
from app.settings import Settings


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
            query = query.where(meta_matches(key, value))  # the rule: app.db.queries.MetaValue
        return query


def parse_meta_filters(items: list[str]) -> list[tuple[str, str]]:
    """`key=value` items: the key is everything before the first '=' (so any stored key without one can be
    filtered on, spaces and dots included), the value everything after it."""
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ApiError(422, f"metadata filter {item!r} must look like key=value (the key is everything before "
                                "the first '=')")
        parsed.append((key, value))
    return parsed


def check_metadata(meta: dict[str, Any]) -> None:
    """A 422 naming what a filter could not handle: a key holding '=' (a filter's key ends at its first '='),
    or a number too large for a double (1e400 parses as infinity, which is not JSON: stored, it would break every
    metadata filter on SQLite)."""
    unfilterable = [key for key in meta if "=" in key]
    if unfilterable:
        raise ApiError(422, f"metadata key {unfilterable[0]!r} contains '=': metadata filters (meta=key=value) "
                            "could never match it; rename the key", detail={"keys": unfilterable})
    for key, value in meta.items():
        if not _finite(value):
            raise ApiError(422, f"metadata key {key!r} holds a number out of the 64-bit float range (or NaN)",
                           detail={"keys": [key]})


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


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
    # The four columns, not ORM objects: building and tracking Image instances was most of this join's time.
    rows = session.execute(select(Image.id, Image.uri, Image.label, Image.meta)
                           .where(Image.id.in_(wanted), Image.deleted_at.is_(None))).all()
    by_id = {row.id: row for row in rows}
    return [
        SearchHit(id=i, score=float(s), uri=by_id[i].uri, label=by_id[i].label, metadata=by_id[i].meta or {})
        for s, i in zip(scores.tolist(), ids.tolist(), strict=True)
        if i in by_id
    ]


def decode_query(deployment: Deployment, data: bytes, settings: Settings, clock: StageClock,
                 box: Box | None = None) -> tuple[PILImage.Image, torch.Tensor]:
    """Decode an uploaded query (JPEGs only as large as the model needs) and preprocess it, in one threadpool
    hop: (the upright RGB image, the model's input tensor). With a `box` the region is cropped first (decoded
    at full scale, so a small region keeps its detail)."""
    t = time.perf_counter()
    image = decode_image(data, settings.max_upload_bytes, settings.max_image_pixels,
                         min_side=None if box is not None else deployment.decode_min_side)
    if box is not None:
        image = crop(image, box)
    t = clock.record("decode", t)
    pixels = deployment.preprocess(image)
    clock.record("preprocess", t)
    return image, pixels


def read_stored_query(deployment: Deployment, uri: str, settings: Settings, clock: StageClock) -> torch.Tensor:
    """A stored image's file as the model's input tensor (for index types that cannot give its vector back):
    decoded and preprocessed exactly as an upload of the same bytes."""
    with open(uri, "rb") as handle:
        data = handle.read()
    return decode_query(deployment, data, settings, clock)[1]


async def embed_pixels(batcher: MicroBatcher, deployment: Deployment, pixels: torch.Tensor,
                       clock: StageClock) -> np.ndarray:
    """One query's vector, through the micro-batcher."""
    t = time.perf_counter()
    vector = await batcher.embed(deployment, pixels)
    clock.ms["forward"] = (time.perf_counter() - t) * 1000  # queue wait + forward; the batcher observes each
    return vector


def _live_hits(session: Session, deployment: Deployment, queries: np.ndarray, pool: int,
               allowed: np.ndarray | None, excluded: list[int], effort: str,
               clock: StageClock) -> tuple[list[SearchHit], int]:
    """The top `pool` live hits, and how many the index found: rows deleted by another process between index
    and SQL are dropped and the search repeats without them."""
    hits: list[SearchHit] = []
    found: list[int] = []
    for _ in range(3):
        t = time.perf_counter()
        exclude_ids = np.asarray(excluded, dtype=np.int64) if excluded else None
        scores, ids = deployment.search(queries, pool, allowed, exclude_ids, effort)
        t = clock.record("search", t)
        hits = hits_for(session, scores[0], ids[0])
        clock.record("metadata", t)
        found = [int(i) for i in ids[0] if i >= 0]
        dropped = set(found) - {h.id for h in hits}
        if not dropped:
            break
        excluded.extend(dropped)
    return hits, len(found)


def _rerank(deployment: Deployment, vector: np.ndarray, hits: list[SearchHit], ranking: Ranking,
            need: int) -> list[SearchHit]:
    if ranking.diversify is not None:
        hits = crowd(hits, ranking.per_group, ranking.group_key())
    if ranking.mmr is not None and hits:
        ids, vectors = deployment.vectors(np.array([h.id for h in hits], dtype=np.int64))
        by_id = {h.id: h for h in hits}
        order = mmr_order(vector.astype(np.float32), vectors, ranking.mmr, need)
        picked = [by_id[int(ids[i])] for i in order]
        # Hits whose vector is not at hand (neither in the index nor stored) follow in rank order.
        hits = picked + [h for h in hits if h.id not in set(ids.tolist())]
    return hits


def _search_and_join(session: Session, deployment: Deployment, vector: np.ndarray, k: int, filters: Filters,
                     min_score: float | None, clock: StageClock, exclude: list[int] | None,
                     ranking: Ranking) -> list[SearchHit]:
    allowed = None
    if filters.active:
        t = time.perf_counter()
        allowed = allowed_ids(session, filters)
        clock.record("metadata", t)
        if len(allowed) == 0:
            return []
    excluded = list(exclude or [])
    queries = vector[None, :].astype(np.float32)
    need = ranking.offset + k
    pool = ranking.pool_size(need)
    while True:
        hits, found = _live_hits(session, deployment, queries, pool, allowed, excluded, ranking.effort, clock)
        if min_score is not None:
            hits = [h for h in hits if h.score >= min_score]
        ranked = _rerank(deployment, vector, hits, ranking, need) if ranking.reranks else hits
        # Crowding can leave the page short while more candidates exist: widen the pool and re-rank.
        if len(ranked) >= need or found < pool or pool >= POOL_MAX or not ranking.reranks:
            break
        if min_score is not None and len(hits) < found:
            break  # the pool already reaches below min_score: a wider one adds nothing that counts
        pool = min(pool * POOL_FACTOR, POOL_MAX)
    return ranked[ranking.offset:need]


async def search_and_join(session: Session, deployment: Deployment, vector: np.ndarray, k: int,
                          filters: Filters, min_score: float | None, clock: StageClock,
                          exclude: list[int] | None = None, ranking: Ranking | None = None) -> list[SearchHit]:
    """Top-k live images for `vector`: filtered in SQL first (an IDSelector in FAISS), joined with SQL after,
    all in one threadpool hop; `ranking` pages (offset), picks the effort and diversifies (app/ranking.py).

    Rows deleted by another process between index and SQL are dropped and the search repeats without them,
    so k results come back whenever k live matches exist.
    """
    return await run_in_threadpool(_search_and_join, session, deployment, vector, k, filters, min_score, clock,
                                   exclude, ranking or Ranking())
