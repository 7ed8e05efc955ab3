"""Step 3, publish: all stored embeddings of live images -> a FAISS index (type picked from the corpus size
unless a factory is given, search params tuned to a recall target) written under a temporary name, renamed into
<indexes_dir>/<version>, and only then inserted in SQL and promoted. If the active index already holds exactly
the live images, nothing is published."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.db.models import IndexVersion, ModelVersion
from app.db.queries import live_image_ids
from app.db.session import session_scope
from app.indexing.report import BuildReport
from app.registry import active_index, new_version_name, promote
from app.settings import Settings
from index import versions
from index.builders import build, build_ivf_ondisk, check_factory, choose_factory, fill_parts

# Rows per filled IVF copy of an on-disk build (a Ray build fills each copy in its own task).
ONDISK_PART_ROWS = 100_000


def published_ids(version_path: str | Path) -> np.ndarray | None:
    """The sorted live ids a published version holds (its ids.npy), or None for a version without one."""
    path = Path(version_path) / versions.IDS_FILE
    return np.load(path) if path.exists() else None


def publish_index(settings: Settings, model: ModelVersion, report: BuildReport, factory: str | None = None,
                  force: bool = False, ondisk: bool = False, fill: Callable[..., list] = fill_parts) -> None:
    """Build an index over every live image's stored embedding and publish it, unless nothing changed.

    With no live image at all, an empty index of the model's dimension is published only when none is active:
    an active index is never replaced by an empty one (that is what a build of a wrong folder would do).
    """
    url = settings.resolved_database_url
    store = settings.embeddings_dir(model.name)
    versions.sweep_tmp(settings.indexes_dir)
    snapshot_at = datetime.now(UTC).isoformat()  # changes after this are not in the new version (verify)
    with session_scope(url) as session:
        live = live_image_ids(session)
        current = active_index(session)
        if current is not None and len(live) == 0:
            report.total_indexed = current.ntotal
            report.message = f"no live image: index {current.name} stays active (an empty index replaces none)"
            return
        if current is not None and current.model_version_id == model.id and not force \
                and (factory is None or factory == current.factory):
            held = published_ids(current.path)
            if held is not None and np.array_equal(held, live):
                report.total_indexed = len(held)
                report.message = f"index {current.name} is up to date: nothing to publish"
                return
    ids, vectors = versions.load_embeddings(store, keep=live)
    missing = np.setdiff1d(live, ids)
    if len(missing):
        raise RuntimeError(f"{len(missing)} live images have no embedding (first: {missing[:10].tolist()}); "
                           "run the build (or merge) again")
    if len(ids) == 0:
        vectors = np.zeros((0, model.dim), dtype=np.float32)  # an empty corpus still has the model's dimension
    budget = settings.index_memory_mb << 20
    factory = factory or choose_factory(len(ids), model.dim, budget)
    check_factory(factory, model.dim, len(ids))  # FAISS's own error would come mid-build, as a traceback
    start = time.perf_counter()
    workdir: Path | None = None
    if ondisk and "IVF" in factory:
        # One filled IVF per slice of the rows, their lists merged on disk (FAISS's on-disk merge). Slices of the
        # rows loaded above, not the shards themselves: an id embedded twice (a rerun after a lost actor) is in
        # two shards, and a fold may delete a shard while it is read; the loaded rows hold each id once.
        workdir = settings.indexes_dir / f".ondisk-{new_version_name('tmp')}"
        parts = ((ids[start:start + ONDISK_PART_ROWS], vectors[start:start + ONDISK_PART_ROWS])
                 for start in range(0, len(ids), ONDISK_PART_ROWS))
        index = build_ivf_ondisk(ids, vectors, parts, factory, workdir, settings.index_recall_target, fill=fill)
    else:
        index = build(ids, vectors, factory, budget, settings.index_recall_target)
    build_seconds = time.perf_counter() - start
    name = new_version_name("index")

    def write(tmp: Path) -> None:
        if workdir is not None:
            # The merged lists move with the version; load() finds them next to index.faiss.
            os.replace(workdir / "merged.ivfdata", tmp / "merged.ivfdata")
            shutil.rmtree(workdir, ignore_errors=True)
        index.save(tmp)
        np.save(tmp / versions.IDS_FILE, np.sort(ids))
        versions.link_shards(store, tmp / versions.EMBEDDINGS_DIR)

    path = versions.publish(settings.indexes_dir, name, write)
    with session_scope(url) as session:
        row = IndexVersion(name=name, model_version_id=model.id, path=str(path.resolve()), factory=factory,
                           ntotal=len(index), params=index.params,
                           metrics={"build_seconds": round(build_seconds, 3), "snapshot_at": snapshot_at})
        session.add(row)
        session.flush()
        promote(session, row)  # the SQL flip comes last
    report.index_version_name, report.total_indexed, report.factory = name, len(index), factory
    report.message = f"published index {name} ({factory}, {len(index)} vectors)"
    prune_versions(settings)


def prune_versions(settings: Settings) -> list[Path]:
    """Keep the active version and the newest `keep_versions` on disk; delete the other directories."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(IndexVersion).order_by(IndexVersion.created_at.desc(),
                                                             IndexVersion.id.desc())).all()
        keep = {r.name for r in rows if r.status == "active"} | {r.name for r in rows[: settings.keep_versions]}
        for row in rows:
            if row.name not in keep and row.status != "retired":
                row.status = "retired"
    return versions.prune(settings.indexes_dir, keep)
