"""The few SQL queries that the batch job and the service both need."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Image

# Ids per IN (...) clause: stays under SQLite's bound-parameter limit.
SQL_IN_CHUNK = 900


def live_image_ids(session: Session) -> np.ndarray:
    """Ids of every image not deleted, ascending."""
    rows = session.scalars(select(Image.id).where(Image.deleted_at.is_(None)).order_by(Image.id))
    return np.fromiter(rows, dtype=np.int64)


def image_uris(session: Session, ids: np.ndarray) -> dict[int, str]:
    """id -> uri for the given ids (deleted or not), queried in chunks."""
    found: dict[int, str] = {}
    for start in range(0, len(ids), SQL_IN_CHUNK):
        part = [int(i) for i in ids[start : start + SQL_IN_CHUNK]]
        found.update(session.execute(select(Image.id, Image.uri).where(Image.id.in_(part))).tuples().all())
    return found
