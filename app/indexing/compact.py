"""Compaction of online changes: the active index version plus the embeddings of images added through the API,
minus the images deleted since, published as a new version (nothing is re-embedded).

API writes land in SQL, in the embedding store and in the serving process's live index; the published version
on disk lags behind, and every start re-applies the difference (deployment.reconcile). Compacting folds it in,
so a restart does no catch-up work and `index verify` sees a version that matches SQL.

Two things are decided in SQL, so replicas never publish conflicting versions: a lease (one compaction at a
time; app/db/leases.py), and the promotion itself, which retires the base version only if it is still the
active one (a batch build or another replica that published meanwhile wins, and this version is dropped).

When the active version's files cannot be loaded (the service then serves a fallback, app.deployment), the
compaction rebuilds the index from the stored embeddings instead, which publishes a good version again.

Either way it first folds the model's one-row API embedding shards into one (app/indexing/fold.py).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import update

from app.db import leases
from app.db.models import IndexVersion, ModelVersion
from app.db.queries import live_image_ids
from app.db.session import session_scope
from app.indexing.fold import fold_api_shards
from app.indexing.publish import prune_versions, published_ids
from app.registry import active_index, new_version_name, promote
from app.settings import Settings
from index import versions
from index.vector_index import VectorIndex

LEASE = "compact_index"
LEASE_TTL_S = 600.0


@dataclass
class CompactReport:
    published: str | None = None
    base: str | None = None
    added: int = 0
    removed: int = 0
    folded_shards: int = 0  # API embedding shards folded into one
    pending: int = 0  # live images still left out: no stored embedding for the model yet
    seconds: float = 0.0
    message: str = ""


def compact_index(settings: Settings, owner: str) -> CompactReport:
    """Publish the active version + online adds - deletes as a new version, unless there is nothing to fold in."""
    url = settings.resolved_database_url
    start = time.perf_counter()
    with leases.holding(url, LEASE, owner, LEASE_TTL_S) as taken:
        if not taken:
            return CompactReport(message="another process is compacting; skipped")
        report = _compact(settings, url)
    report.seconds = time.perf_counter() - start
    return report


def _compact(settings: Settings, url: str) -> CompactReport:
    snapshot_at = datetime.now(UTC).isoformat()  # changes after this are not in the new version (verify)
    with session_scope(url) as session:
        base = active_index(session)
        if base is None:
            return CompactReport(message="no active index version: nothing to compact")
        model = session.get(ModelVersion, base.model_version_id)
        live = live_image_ids(session)
        base_id, base_name, base_path, factory = base.id, base.name, Path(base.path), base.factory
        model_id, store = base.model_version_id, settings.embeddings_dir(model.name if model else "")
    report = CompactReport(base=base_name, folded_shards=fold_api_shards(url, store))
    try:
        held = published_ids(base_path)
        index = VectorIndex.load(base_path)
    except Exception as exc:  # a corrupt or missing file (the service serves a fallback): heal by rebuilding
        from app.indexing.pipeline import rebuild_index

        rebuilt = rebuild_index(settings, progress=False)
        report.published = rebuilt.index_version_name
        report.message = (f"index {base_name} cannot be loaded ({exc.__class__.__name__}); rebuilt from stored "
                          f"embeddings as {rebuilt.index_version_name}{_folded(report)}")
        return report
    if held is None:  # published before versions recorded their ids
        held = np.sort(index.live_ids())
    removed = np.setdiff1d(held, live)
    added_ids, vectors = versions.load_embeddings(store, keep=np.setdiff1d(live, held))
    report.pending = len(np.setdiff1d(live, held)) - len(added_ids)
    if len(removed) == 0 and len(added_ids) == 0:
        report.message = f"index {base_name} is up to date: nothing to compact{_folded(report)}"
        return report
    if len(removed):
        index.remove(removed)
    if len(added_ids):
        if index.ntotal == 0 and index.dim != vectors.shape[1]:
            index = VectorIndex(vectors.shape[1], "Flat")  # an empty corpus published before the model's dim
        index.add_or_revive(added_ids, vectors)
    ids = np.union1d(np.setdiff1d(held, removed), added_ids)
    name = new_version_name("index")

    def write(tmp: Path) -> None:
        index.save(tmp)
        np.save(tmp / versions.IDS_FILE, ids)
        versions.link_shards(store, tmp / versions.EMBEDDINGS_DIR)

    path = versions.publish(settings.indexes_dir, name, write)
    with session_scope(url) as session:
        # Compare-and-swap on the base: retire it only if it is still the active version.
        still_active = session.execute(
            update(IndexVersion).where(IndexVersion.id == base_id, IndexVersion.status == "active")
            .values(status="retired")
        ).rowcount
        if still_active:
            row = IndexVersion(name=name, model_version_id=model_id, path=str(path.resolve()), factory=factory,
                               ntotal=len(index), params=index.params,
                               metrics={"compacted_from": base_name, "added": len(added_ids),
                                        "removed": len(removed), "snapshot_at": snapshot_at})
            session.add(row)
            session.flush()
            promote(session, row)
    if not still_active:
        shutil.rmtree(path, ignore_errors=True)
        report.message = f"index {base_name} was replaced while compacting; dropped {name}"
        return report
    report.published, report.added, report.removed = name, len(added_ids), len(removed)
    report.message = (f"published index {name}: {base_name} + {len(added_ids)} added - {len(removed)} removed "
                      f"({len(index)} vectors){_folded(report)}")
    prune_versions(settings)
    return report


def _folded(report: CompactReport) -> str:
    return f"; {report.folded_shards} API embedding shards folded into one" if report.folded_shards else ""
