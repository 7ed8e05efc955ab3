"""Near-duplicate groups of stored images (resized, re-encoded, lightly cropped copies), found by FAISS range
searches rather than an all-pairs loop, paged by image id.

A group is a connected component of the "scores >= threshold" graph, anchored at its smallest id. A page scans
live ids above the cursor in batches: one range search per batch; an image with a neighbour grows its
component (more range searches, from the new members only). A component whose smallest id is below the one
being scanned was reported on an earlier page and is skipped, so pages never repeat a group. `next_cursor` is
the anchor of the page's last group, or the last id scanned when SCAN_LIMIT images were scanned first (the
page is then short, possibly empty, and the client follows next_cursor). Cost: one range search per live image
scanned, which FAISS batches (a matrix product on Flat, a bounded walk on HNSW, nprobe lists on IVF).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Image
from app.db.queries import SQL_IN_CHUNK, live_image_ids
from app.deployment import Deployment

SCAN_BATCH = 256
# Images scanned per request at most: a page can end short (even empty) with a next_cursor, so one request stays
# bounded on a large catalogue with few duplicates.
SCAN_LIMIT = 20_000
# A chain of near-identical images can join many; a group stops growing here (its pairs grow as the square).
MAX_GROUP = 50


@dataclass
class Group:
    ids: list[int]
    pairs: list[tuple[int, int, float]]


def _neighbours(deployment: Deployment, ids: np.ndarray, threshold: float,
                live: np.ndarray) -> dict[int, list[int]]:
    """id -> the other live ids scoring >= threshold with it."""
    found_ids, vectors = deployment.vectors(ids)
    out: dict[int, list[int]] = {}
    if not len(found_ids):
        return out
    for image_id, (scores, hits) in zip(found_ids.tolist(), deployment.range_search(vectors, threshold),
                                        strict=True):
        keep = (hits != image_id) & (scores >= threshold) & np.isin(hits, live)
        out[image_id] = hits[keep].tolist()
    return out


def _component(deployment: Deployment, seed: int, first: list[int], threshold: float,
               live: np.ndarray) -> list[int]:
    members, frontier = {seed, *first}, list(first)
    while frontier and len(members) < MAX_GROUP:
        grown = _neighbours(deployment, np.array(frontier, dtype=np.int64), threshold, live)
        frontier = [n for ns in grown.values() for n in ns if n not in members]
        frontier = list(dict.fromkeys(frontier))[: MAX_GROUP - len(members)]
        members.update(frontier)
    return sorted(members)


def _pairs(deployment: Deployment, ids: list[int]) -> list[tuple[int, int, float]]:
    found, vectors = deployment.vectors(np.array(ids, dtype=np.int64))
    scores = vectors @ vectors.T
    pairs = [(int(found[i]), int(found[j]), round(float(scores[i, j]), 4))
             for i in range(len(found)) for j in range(i + 1, len(found))]
    return sorted(pairs, key=lambda p: -p[2])


def find_groups(session: Session, deployment: Deployment, threshold: float, limit: int,
                cursor: int | None) -> tuple[list[Group], int | None]:
    """Up to `limit` groups anchored above `cursor`, and the cursor of the next page (None at the end)."""
    live = live_image_ids(session)
    session.commit()  # hands the connection back during the range searches
    start = int(np.searchsorted(live, cursor, side="right")) if cursor is not None else 0
    groups: list[Group] = []
    seen: set[int] = set()
    stop = min(len(live), start + SCAN_LIMIT)
    for batch_start in range(start, stop, SCAN_BATCH):
        batch = live[batch_start:min(batch_start + SCAN_BATCH, stop)]
        near = _neighbours(deployment, batch, threshold, live)
        for image_id in batch.tolist():
            if image_id in seen or not near.get(image_id):
                continue
            members = _component(deployment, image_id, near[image_id], threshold, live)
            seen.update(members)
            if members[0] < image_id:
                continue  # anchored at a smaller id: an earlier page (or this one) has it
            groups.append(Group(ids=members, pairs=_pairs(deployment, members)))
            if len(groups) == limit:
                more = image_id < int(live[-1])
                return groups, image_id if more else None
    return groups, int(live[stop - 1]) if stop < len(live) else None


def keeper_first(session: Session, ids: list[int]) -> list[Image]:
    """The group's rows, the suggested keeper (largest resolution, then oldest, then smallest id) first."""
    rows: list[Image] = []
    for start in range(0, len(ids), SQL_IN_CHUNK):
        rows.extend(session.scalars(select(Image).where(Image.id.in_(ids[start:start + SQL_IN_CHUNK]))))
    keeper = min(rows, key=lambda r: (-r.width * r.height, r.created_at, r.id))
    return [keeper] + sorted((r for r in rows if r.id != keeper.id), key=lambda r: r.id)


def near_duplicate_of(deployment: Deployment, vector: np.ndarray, threshold: float) -> tuple[int, float] | None:
    """The stored image most similar to `vector` when it scores >= threshold (an upload's near-duplicate)."""
    scores, ids = deployment.search(vector[None, :].astype(np.float32), 1)
    if ids[0, 0] >= 0 and scores[0, 0] >= threshold:
        return int(ids[0, 0]), float(scores[0, 0])
    return None
