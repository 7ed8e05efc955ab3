"""`retrieval index verify`: SQL and the active index agree (every live row indexed once, nothing else).

It also lists the live images whose file is gone from disk (deleted or moved outside the tool): not a
disagreement between SQL and the index, so not a problem, but their thumbnails and heatmaps cannot be served; a
folder build notices them too, and `--prune` retires them.

Online changes not compacted yet are not problems: an image added through the API after the version was
published is missing from it but has its embedding in the store (the service serves it from there), and an image
deleted after publishing is still in it (the service removes it at load). Those are counted as pending; anything
else that disagrees is listed as a problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.db.models import Image, ModelVersion
from app.db.queries import live_image_ids
from app.db.session import session_scope
from app.indexing.register import file_gone
from app.registry import active_index
from app.settings import Settings
from index import versions
from index.vector_index import VectorIndex


@dataclass
class VerifyReport:
    version: str | None
    problems: list[str] = field(default_factory=list)
    pending_adds: int = 0
    pending_deletes: int = 0
    missing_files: list[str] = field(default_factory=list)  # paths of live images whose file is not there

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def pending(self) -> int:
        return self.pending_adds + self.pending_deletes


def verify_index(settings: Settings, max_listed: int = 20) -> VerifyReport:
    """Check SQL and the active index agree: every live row indexed once; no deleted or unknown id indexed."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        current = active_index(session)
        if current is None:
            return VerifyReport(None, ["no active index version"])
        live = live_image_ids(session)
        uris = session.scalars(select(Image.uri).where(Image.deleted_at.is_(None)).order_by(Image.id)).all()
        known = np.fromiter(session.scalars(select(Image.id)), dtype=np.int64)
        # The version holds SQL as read at its snapshot (older versions: their creation), so a delete after
        # that is pending, not a problem.
        snapshot = (current.metrics or {}).get("snapshot_at")
        since = datetime.fromisoformat(snapshot) if snapshot else current.created_at
        deleted_since = np.fromiter(session.scalars(
            select(Image.id).where(Image.deleted_at.is_not(None), Image.deleted_at > since)), dtype=np.int64)
        model = session.get(ModelVersion, current.model_version_id)
        name, path, sql_ntotal = current.name, Path(current.path), current.ntotal
        store = settings.embeddings_dir(model.name) if model is not None else None
    report = VerifyReport(name, missing_files=[uri for uri in uris if file_gone(uri)])
    if not (path / "index.faiss").exists():
        report.problems.append(f"index files of {name} are missing at {path}")
        return report
    try:
        index = VectorIndex.load(path)
    except Exception as exc:  # a corrupt file: name it rather than crash
        report.problems.append(f"index file of {name} at {path} cannot be read: {exc.__class__.__name__}: {exc}")
        return report
    held = index.live_ids()

    def listed(what: str, ids: np.ndarray) -> None:
        if len(ids):
            report.problems.append(f"{len(ids)} {what}: {ids[:max_listed].tolist()}")

    unique, counts = np.unique(held, return_counts=True)
    listed("ids indexed more than once", unique[counts > 1])
    missing = np.setdiff1d(live, unique)
    stored = versions.embedded_ids(store) if store is not None and len(missing) else np.zeros(0, np.int64)
    report.pending_adds = int(np.isin(missing, stored).sum())
    listed("live images missing from the index, with no stored embedding", missing[~np.isin(missing, stored)])
    deleted_held = np.setdiff1d(np.intersect1d(unique, known), live)
    report.pending_deletes = int(np.isin(deleted_held, deleted_since).sum())
    listed("images deleted before this version was published, still in it",
           deleted_held[~np.isin(deleted_held, deleted_since)])
    listed("unknown ids in the index (no such image row)", np.setdiff1d(unique, known))
    if sql_ntotal != len(index):
        report.problems.append(f"SQL says {sql_ntotal} vectors, the index holds {len(index)}")
    return report
