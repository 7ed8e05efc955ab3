"""Shared request helpers: the loaded deployment, and the SQL join from index ids to image rows."""

from __future__ import annotations

import numpy as np
from fastapi import Request
from sqlalchemy import select

from app.db.models import Image
from app.db.session import session_scope
from app.deployment import Deployment
from app.errors import ApiError
from app.schemas import SearchHit
from app.settings import Settings


def get_deployment(request: Request) -> Deployment:
    deployment = getattr(request.app.state, "deployment", None)
    if deployment is None:
        raise ApiError(503, "no index is active yet: build one with `retrieval index build SOURCE`",
                       code="not_ready", headers={"Retry-After": "30"})
    return deployment


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
