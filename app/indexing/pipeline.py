"""The index-building runs, each resumable after `kill -9` at any moment because each step derives its work
from durable state: `build_index` (register -> embed -> publish), `merge_shards` and `rebuild_index`
(embed what is missing -> publish)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from app.db import leases
from app.indexing.compact import LEASE, LEASE_TTL_S
from app.indexing.embed import embed_missing
from app.indexing.fold import fold_api_shards
from app.indexing.publish import publish_index
from app.indexing.register import register_source
from app.indexing.report import BuildReport, EmptySource
from app.registry import embedder_version_name, ensure_active_model
from app.settings import Settings
from index.builders import check_factory
from models.data import IMAGE_SUFFIXES


def _finish(report: BuildReport, start: float, progress: bool) -> BuildReport:
    report.seconds = time.perf_counter() - start
    if progress:
        print(report.summary())
    return report


def build_index(settings: Settings, source: str | Path, *, shard: tuple[int, int] | None = None,
                factory: str | None = None, progress: bool = True, ray_address: str | None = None,
                prune: bool = False) -> BuildReport:
    """Register `source`, embed what is missing, publish a new index version (not in shard mode).

    ray_address: embed on a Ray cluster instead of this process ('' starts a local one, 'auto' joins a running
    one, or host:port); IVF types are then filled in slices of rows and merged with FAISS's on-disk merge.
    Raises EmptySource, before anything is published, when the source lists no image file.
    """
    start = time.perf_counter()
    report = BuildReport()
    if ray_address is None:  # this process embeds: a device it lacks is said before anything is registered
        from models.embedder import resolve_device

        resolve_device(settings.device)
    model = ensure_active_model(settings)
    if "embedder" in settings.model_fields_set and embedder_version_name(settings.embedder) != model.name:
        report.notes.append(f"embedded with the active model {model.name}, not RETRIEVAL_EMBEDDER={settings.embedder}"
                            " (it only picks the first model); to move the corpus to it: retrieval jobs submit "
                            f"reembed --set model_version={settings.embedder}, and a worker running")
    if factory:  # a type FAISS cannot parse is said now, not after every image is embedded
        check_factory(factory, model.dim)
    slice_ids = register_source(settings, source, shard, report, progress, prune=prune)
    if report.seen == 0 and shard is None:
        if Path(source).is_file():
            raise EmptySource(f"the manifest {source} lists no image (no row with a path): nothing registered or "
                              "published")
        raise EmptySource(f"no image file under {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
                          "in it and its sub-folders, symlinked ones included): nothing registered or published")
    if ray_address is not None and shard is None:
        from app.indexing.ray_build import connected, ray_embed_missing, ray_fill_parts

        with connected(ray_address):  # one cluster session for embedding and the IVF fills
            ray_embed_missing(settings, model, report, progress)
            publish_index(settings, model, report, factory=factory, ondisk=True, fill=ray_fill_parts)
        return _finish(report, start, progress)
    embed_missing(settings, model, slice_ids if shard else None, report, progress,
                  stem_prefix=f"shard{shard[0]}of{shard[1]}" if shard else "run")
    if shard is None:
        publish_index(settings, model, report, factory=factory)
    else:
        report.message = (f"shard {shard[0]}/{shard[1]}: embeddings stored in {settings.embeddings_dir(model.name)}; "
                          "run `retrieval index merge` once every shard is done")
    return _finish(report, start, progress)


def _republish(settings: Settings, *, factory: str | None, ondisk: bool, force: bool, progress: bool,
               stem_prefix: str, fold: bool = False) -> BuildReport:
    start = time.perf_counter()
    report = BuildReport()
    model = ensure_active_model(settings)
    if fold:
        _fold_unless_compacting(settings, model.name)
    embed_missing(settings, model, None, report, progress, stem_prefix=stem_prefix)
    publish_index(settings, model, report, factory=factory, force=force, ondisk=ondisk)
    return _finish(report, start, progress)


def merge_shards(settings: Settings, *, factory: str | None = None, ondisk: bool = False,
                 progress: bool = True) -> BuildReport:
    """After sharded runs: embed any live image still missing, then build and publish one index.

    ondisk=True (IVF factories): one filled IVF per 100,000 rows, merged with FAISS's on-disk merge.
    """
    return _republish(settings, factory=factory, ondisk=ondisk, force=False, progress=progress,
                      stem_prefix="merge")


def rebuild_index(settings: Settings, *, factory: str | None = None, progress: bool = True) -> BuildReport:
    """Re-type or compact the active index from stored embeddings (no image is decoded if none is missing).
    With no index active and no image stored, this publishes an empty index: a corpus started through the API."""
    return _republish(settings, factory=factory, ondisk=False, force=True, progress=progress,
                      stem_prefix="rebuild", fold=True)


def _fold_unless_compacting(settings: Settings, model_name: str) -> None:
    """Fold the API embedding shards under the compaction lease; a compaction holding it folds them itself."""
    url, owner = settings.resolved_database_url, f"rebuild-{os.getpid()}"
    with leases.holding(url, LEASE, owner, LEASE_TTL_S) as taken:
        if taken:
            fold_api_shards(url, settings.embeddings_dir(model_name))
