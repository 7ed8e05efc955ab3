"""`retrieval index verify`: SQL and the active index agree (every live row indexed once, nothing else)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.db.models import Image
from app.db.queries import live_image_ids
from app.db.session import session_scope
from app.registry import active_index
from app.settings import Settings
from index.vector_index import VectorIndex


@dataclass
class VerifyReport:
    version: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_index(settings: Settings, max_listed: int = 20) -> VerifyReport:
    """Check SQL and the active index agree: every live row indexed once; no deleted or unknown id indexed."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        current = active_index(session)
        if current is None:
            return VerifyReport(None, ["no active index version"])
        live = live_image_ids(session)
        known = np.fromiter(session.scalars(select(Image.id)), dtype=np.int64)
        name, path, sql_ntotal = current.name, Path(current.path), current.ntotal
    report = VerifyReport(name)
    if not (path / "index.faiss").exists():
        report.problems.append(f"index files of {name} are missing at {path}")
        return report
    index = VectorIndex.load(path)
    held = index.live_ids()

    def listed(what: str, ids: np.ndarray) -> None:
        if len(ids):
            report.problems.append(f"{len(ids)} {what}: {ids[:max_listed].tolist()}")

    unique, counts = np.unique(held, return_counts=True)
    listed("ids indexed more than once", unique[counts > 1])
    listed("live images missing from the index", np.setdiff1d(live, unique))
    listed("deleted images still in the index", np.setdiff1d(np.intersect1d(unique, known), live))
    listed("unknown ids in the index (no such image row)", np.setdiff1d(unique, known))
    if sql_ntotal != len(index):
        report.problems.append(f"SQL says {sql_ntotal} vectors, the index holds {len(index)}")
    return report

