"""The serving pair (the active model version's embedder + the index built with it), and hot swapping it.

A Deployment is immutable from the outside except for its live index, which API writes change under
`index_lock`. Requests take `app.state.deployment` once at their start and use that object to the end, so a
swap (one reference assignment) never disturbs a request in flight: it finishes on the old pair.

Loading reconciles the index with SQL, the source of truth: ids deleted since the build are removed; live ids
missing from the index get their stored embedding from <data_dir>/embeddings/<model>/ (where POST /v1/images
writes one before answering), or are embedded from their file when only a few are missing, through the index
build's own path (app.indexing.embed_into_store: the same shards, and a file that no longer decodes is marked
deleted with its reason). That is what makes an added image survive a restart and a hot swap.

When the active index file is missing or corrupt at start, load_active serves the newest earlier version of the
same model, else an index rebuilt from the embedding store, both reconciled as above, and says which in /readyz;
a corrupt version met at a hot swap is refused and the old pair keeps serving (check_for_new_version).

A service started before its database is set up (`retrieval serve` before `retrieval db upgrade`) or before any
index is published says what to do once, in one log line, and /readyz says it for as long as it holds: each poll
of the hot-swap watcher brings that message up to date (ServingState.database_failed, NO_ACTIVE_INDEX).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image as PILImage
from sqlalchemy import select

from app import metrics
from app.batching import default_max_batch_size
from app.db.models import IndexVersion, ModelVersion
from app.db.queries import live_image_ids
from app.db.session import database_problem, session_scope
from app.indexing import BuildReport, embed_into_store
from app.indexing.fold import API_SHARD_PREFIX
from app.inference import load_runner
from app.registry import active_index
from app.schemas import utc_timestamp
from app.settings import Settings
from index import versions
from index.shard_lookup import ShardLookup
from index.vector_index import VectorIndex
from models.checkpoint import load_checkpoint
from models.embedder import Embedder, eval_transform
from models.runtime import Runner, TorchRunner

log = logging.getLogger(__name__)

NO_ACTIVE_INDEX = ("no active index yet: run `retrieval index build SOURCE` (a folder or a CSV manifest), or "
                   "`retrieval index rebuild` for an empty index that uploads fill")
SET_UP_FIRST = ("run `retrieval db upgrade`, then `retrieval index build SOURCE` (or `retrieval index rebuild` for an "
                "empty index)")


@dataclass(eq=False)
class Deployment:
    model_name: str
    index_name: str
    runner: Runner  # the embedder on its inference runtime (app.inference.load_runner)
    index: VectorIndex
    store: Path
    # FAISS indexes are not safe for a search concurrent with add/remove; searches are short, so one lock.
    index_lock: threading.RLock = field(default_factory=threading.RLock)
    # Online changes this pair applied at load on top of its published version (see ServingState.pending).
    reconciled: dict[str, int] = field(default_factory=dict)
    checkpoint_dir: Path | None = None  # the model version's files: heatmaps load its torch embedder from them
    _torch_embedder: Embedder | None = field(default=None, repr=False)
    _torch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._transform = eval_transform(self.runner.config)
        # Where each stored vector lives: a few ids are read without opening every shard (made on first use).
        self._stored = ShardLookup(self.store)

    @property
    def dim(self) -> int:
        return self.runner.dim

    @property
    def index_device(self) -> str:
        """Where searches run now: "gpu", "cpu", or "cpu (why not the GPU)" (place_index, VectorIndex.placement)."""
        return self.index.placement()

    @property
    def device(self) -> str:
        return self.runner.info.device

    @property
    def decode_min_side(self) -> int:
        """The shorter side the model's preprocessing needs: JPEGs may be decoded down to it (app.images)."""
        return self.runner.config.resize_size

    def preprocess(self, image: PILImage.Image) -> torch.Tensor:
        return self._transform(image)

    def forward_batch(self, pixels: torch.Tensor) -> np.ndarray:
        """One forward pass over a preprocessed batch [B, C, H, W] -> float32 [B, D] (called by the batcher)."""
        return self.runner.run(pixels)

    def torch_embedder(self) -> Embedder:
        """The model version's torch embedder (fp32), for what an exported runtime cannot give (the feature maps
        behind heatmaps, app/explain.py): the torch runner's own when serving with torch, else loaded from the
        checkpoint once, on first use, and kept for this deployment's life."""
        if isinstance(self.runner, TorchRunner):
            return self.runner.embedder
        with self._torch_lock:
            if self._torch_embedder is None:
                if self.checkpoint_dir is None:
                    raise ValueError(f"model version {self.model_name} has no checkpoint to explain matches with")
                self._torch_embedder = load_checkpoint(self.checkpoint_dir, device=self.runner.info.device.split()[0])
            return self._torch_embedder

    def embed(self, images: list[PILImage.Image]) -> np.ndarray:
        """Embed images directly, without the batcher (POST /v1/images, scripts)."""
        return self.forward_batch(torch.stack([self.preprocess(im) for im in images]))

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               exclude_ids: np.ndarray | None = None, effort: str = "balanced") -> tuple[np.ndarray, np.ndarray]:
        with self.index_lock:
            return self.index.search(queries, k, allowed_ids=allowed_ids, exclude_ids=exclude_ids, effort=effort)

    def range_search(self, queries: np.ndarray, threshold: float, exclude_ids: np.ndarray | None = None,
                     effort: str = "balanced") -> list[tuple[np.ndarray, np.ndarray]]:
        with self.index_lock:
            return self.index.range_search(queries, threshold, exclude_ids=exclude_ids, effort=effort)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; an image re-added after a delete comes back (VectorIndex.add_or_revive)."""
        with self.index_lock:
            self.index.add_or_revive(ids, vectors)
            metrics.INDEX_VECTORS.set(len(self.index))

    def remove(self, ids: np.ndarray) -> int:
        with self.index_lock:
            removed = self.index.remove(ids)
            metrics.INDEX_VECTORS.set(len(self.index))
            return removed

    def reconstruct(self, image_id: int) -> np.ndarray | None:
        """The stored vector of `image_id` when the index type can give it back (Flat, HNSW), else None."""
        with self.index_lock:
            return self.index.reconstruct(image_id)

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the given images: from the index where its type keeps them, else from the stored
        embeddings of this model; ids with neither are left out."""
        ids = np.asarray(ids, dtype=np.int64)
        found: dict[int, np.ndarray] = {}
        for image_id in ids.tolist():
            vector = self.reconstruct(image_id)
            if vector is not None:
                found[image_id] = vector
        missing = np.array([i for i in ids.tolist() if i not in found], dtype=np.int64)
        if len(missing):
            stored_ids, stored = self.stored_vectors(missing)
            found.update(zip(stored_ids.tolist(), stored, strict=True))
        kept = [i for i in ids.tolist() if i in found]
        if not kept:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.array(kept, dtype=np.int64), np.stack([found[i] for i in kept]).astype(np.float32)

    def stored_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) stored for this model, opening only the shards that hold them; ids without
        one (or with one of another dimension) are left out."""
        stored_ids, stored = self._stored.read(ids)
        if len(stored_ids) == 0 or stored.shape[1] != self.dim:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return stored_ids, stored


def write_api_embedding(store: Path, image_id: int, vector: np.ndarray) -> None:
    """Persist one API-added embedding (fsynced, atomic) so a restart or a rebuild finds it."""
    stem = f"{API_SHARD_PREFIX}-{image_id:012d}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
    versions.write_embedding_shard(store, stem, np.array([image_id], dtype=np.int64), vector[None, :])


def reconcile(settings: Settings, deployment: Deployment, embed_from_files: bool = True) -> dict[str, int]:
    """Make the live index hold exactly SQL's live images (see the module docstring). Returns counts.

    embed_from_files=False only restores stored embeddings (what the periodic convergence with peers wants)."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        live = live_image_ids(session)
    with deployment.index_lock:
        held = deployment.index.live_ids()
    stale = np.setdiff1d(held, live)
    if len(stale):
        deployment.remove(stale)
    missing = np.setdiff1d(live, held)
    restored = embedded = 0
    if len(missing):
        ids, vectors = deployment.stored_vectors(missing)
        if len(ids):
            deployment.add(ids, vectors)
            restored = len(ids)
        still = np.setdiff1d(missing, ids)
        if len(still) and not embed_from_files:
            pass  # a peer's add whose embedding is not visible here yet: the next poll finds it
        elif len(still) and len(still) <= settings.catchup_max_embed:
            embedded = _embed_from_files(settings, deployment, still)
        elif len(still):
            log.warning("%d live images have no embedding for model %s; rebuild the index to include them",
                        len(still), deployment.model_name)
    if len(stale) or restored or embedded:
        log.info("index %s reconciled with SQL: %d removed, %d restored from stored embeddings, %d embedded",
                 deployment.index_name, len(stale), restored, embedded)
    return {"removed": len(stale), "restored": restored, "embedded": embedded}


def _embed_from_files(settings: Settings, deployment: Deployment, ids: np.ndarray) -> int:
    """Embed `ids` with the deployment's own model, the way an index build does (one code path: same shards,
    same handling of files that no longer decode), adding each shard to the index once it is stored."""
    report = BuildReport()
    # No DataLoader workers: this runs inside the server process, where forking next to threads is unsafe.
    embed_into_store(settings, deployment.runner, deployment.store, ids, report, progress=False,
                     stem_prefix=f"{API_SHARD_PREFIX}-catchup", num_workers=0, on_stored=deployment.add)
    for uri, reason in report.failed:
        log.warning("image %s cannot be embedded at load and is marked deleted: %s", uri, reason)
    return report.embedded


def load_deployment(settings: Settings, index_row: IndexVersion, model_row: ModelVersion,
                    runner: Runner | None = None, index: VectorIndex | None = None) -> Deployment:
    """Load a pair (reusing `runner` when the model is the one already served, e.g. after a compaction)."""
    runner = runner or load_runner(settings, model_row.path, serving=True)
    index = index if index is not None else VectorIndex.load(index_row.path)
    if index.ntotal == 0 and (index.dim != runner.dim or not index.is_trained):
        # An empty corpus is a normal state: serve an empty exact index of the model's dimension, which API adds
        # fill (an index published empty by older builds has dimension 0, and an untrained IVF cannot take adds).
        index = VectorIndex(runner.dim, "Flat")
    if index.dim != runner.dim:
        raise ValueError(
            f"index {index_row.name} has dimension {index.dim} but model {model_row.name} embeds to {runner.dim}"
        )
    deployment = Deployment(model_name=model_row.name, index_name=index_row.name, runner=runner, index=index,
                            store=settings.embeddings_dir(model_row.name), checkpoint_dir=Path(model_row.path))
    deployment.reconciled = reconcile(settings, deployment)
    place_index(deployment.index, deployment.runner)
    return deployment


def place_index(index: VectorIndex, runner: Runner) -> str:
    """Search on the GPU when the model runs on one and FAISS can follow it there (faiss-gpu, the `gpu` extra:
    the GPU image has it); else on the CPU, logged with why when the model is on a GPU. Returns where."""
    if not runner.info.on_gpu:
        return index.placement()
    index.to_gpu()
    placement = index.placement()
    if placement == "gpu":
        log.info("index searched on the GPU (%d vectors, %s)", len(index), index.factory)
    else:
        log.warning("the model runs on %s but the index is searched on the %s", runner.info.device, placement)
    return placement


def _active_rows(settings: Settings) -> tuple[IndexVersion, ModelVersion] | None:
    with session_scope(settings.resolved_database_url) as session:
        index_row = active_index(session)
        if index_row is None:
            return None
        model_row = session.get(ModelVersion, index_row.model_version_id)
        if model_row is None:
            raise ValueError(f"index version {index_row.name} names a model version that does not exist")
        return index_row, model_row


def load_active(settings: Settings, state: ServingState | None = None) -> Deployment | None:
    """The active pair; if its index file is missing or corrupt, the newest earlier version of the same model
    that loads, else an index rebuilt from the stored embeddings; both reconciled with SQL, so they serve exactly
    SQL's live images. Which one is served is recorded in `state.fallback` (shown by /readyz)."""
    rows = _active_rows(settings)
    if rows is None:
        return None
    index_row, model_row = rows
    try:
        return load_deployment(settings, index_row, model_row)
    except Exception as exc:
        if not _index_unreadable(exc):
            raise
        problem = f"index {index_row.name} cannot be loaded ({exc.__class__.__name__}: {exc})"
    log.error("%s; falling back", problem)
    runner = load_runner(settings, model_row.path, serving=True)
    for older in _earlier_versions(settings, index_row):
        try:
            index = VectorIndex.load(older.path)
        except Exception:
            continue
        if index.dim == runner.dim:
            deployment = load_deployment(settings, index_row, model_row, runner=runner, index=index)
            _note_fallback(state, f"{problem}; serving the previous version {older.name} brought up to date "
                                  "from the embedding store")
            return deployment
    deployment = load_deployment(settings, index_row, model_row, runner=runner, index=VectorIndex(runner.dim))
    _note_fallback(state, f"{problem}; serving an index rebuilt from the embedding store "
                          f"({len(deployment.index)} vectors)")
    return deployment


def _index_unreadable(exc: Exception) -> bool:
    # FAISS reports unreadable files as RuntimeError; a missing file or bad JSON as OSError/ValueError.
    return isinstance(exc, (OSError, RuntimeError, ValueError)) and not isinstance(exc, NotImplementedError)


def _earlier_versions(settings: Settings, current: IndexVersion) -> list[IndexVersion]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(
            select(IndexVersion).where(IndexVersion.model_version_id == current.model_version_id,
                                       IndexVersion.id != current.id)
            .order_by(IndexVersion.created_at.desc(), IndexVersion.id.desc())).all()
        session.expunge_all()
    return [row for row in rows if Path(row.path).is_dir()]


def _note_fallback(state: ServingState | None, message: str) -> None:
    log.warning(message)
    if state is not None:
        state.fallback = message


@dataclass
class ServingState:
    """What /readyz reports about loading and swapping, next to the deployment itself (app.state.deployment)."""

    load_error: str | None = None
    swap_error: dict[str, Any] | None = None
    last_swap: dict[str, Any] | None = None
    failed_version: str | None = None
    # Set when the active index file could not be loaded and another source serves instead (load_active).
    fallback: str | None = None
    # Online adds + deletes not in the served version's published files yet; compaction folds them in.
    pending: int = 0
    pending_since: float | None = None  # time.monotonic() of the oldest of them
    last_compaction: dict[str, Any] | None = None
    # Why SQL cannot be read (not set up yet, not answering): logged once per change, in /readyz while nothing loads.
    database_problem: str | None = None
    # Serialises API writes with the final step of a swap, so no write lands on an index being replaced.
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    def database_failed(self, exc: BaseException, url: str, serving: bool) -> bool:
        """Note a failure to read SQL that is the database's state, not a bug: one log line when it differs from
        the last one, and the /readyz message when nothing is served. False for any other error (the caller
        raises it)."""
        found = database_problem(exc, url)
        if found is None:
            return False
        problem, set_up = found
        message = f"{problem}: {SET_UP_FIRST}" if set_up else f"{problem}; retrying every poll"
        if message != self.database_problem:
            log.warning("%s", message)
        self.database_problem = message
        if not serving:
            self.load_error = message
        return True

    def database_ok(self) -> None:
        """SQL answered: a database problem noted before is over (and no longer in /readyz)."""
        if self.database_problem is not None:
            log.info("the database is set up and answering now")
            if self.load_error == self.database_problem:
                self.load_error = None
            self.database_problem = None

    def note_changes(self, count: int) -> None:
        """Record online changes (API writes, or differences a load reconciled) for the compaction trigger."""
        if count > 0:
            self.pending += count
            if self.pending_since is None:
                self.pending_since = time.monotonic()

    def reset_pending(self, count: int) -> None:
        """A new version is served: what is pending now is what its load had to reconcile."""
        self.pending, self.pending_since = 0, None
        self.note_changes(count)


def swap_in(app: FastAPI, settings: Settings, new: Deployment) -> None:
    """Install `new` atomically: catch up on writes made while it loaded, then one reference assignment.

    The error fields are cleared and last_swap written before the assignment, so /readyz never shows the new
    version next to the previous failure."""
    state: ServingState = app.state.serving
    with state.write_lock:
        late = reconcile(settings, new)
        old = app.state.deployment
        state.failed_version, state.swap_error, state.load_error, state.fallback = None, None, None, None
        state.reset_pending(sum(new.reconciled.values()) + sum(late.values()))
        state.last_swap = {"from": getattr(old, "index_name", None), "to": new.index_name,
                           "model": new.model_name, "at": utc_timestamp(datetime.now(UTC))}
        app.state.deployment = new
    fit_batch_cap(app, settings, new)
    metrics.INDEX_VECTORS.set(len(new.index))


def fit_batch_cap(app: FastAPI, settings: Settings, deployment: Deployment) -> None:
    """The default batch cap (RETRIEVAL_MAX_BATCH_SIZE=0) follows where the loaded runtime runs, known only once
    it is loaded: ONNX Runtime asked for CUDA without its CUDA provider runs on the CPU."""
    if not settings.max_batch_size:
        app.state.batcher.max_batch_size = default_max_batch_size("cuda" if deployment.runner.info.on_gpu else "cpu")


async def check_for_new_version(app: FastAPI, settings: Settings) -> bool:
    """Load and swap in the active version when it is not the one served. True when a swap happened."""
    state: ServingState = app.state.serving
    current: Deployment | None = app.state.deployment
    try:
        rows = await asyncio.to_thread(_active_rows, settings)
    except Exception as exc:
        if state.database_failed(exc, settings.resolved_database_url, serving=current is not None):
            return False
        raise
    state.database_ok()
    if rows is None:
        if current is None:
            state.load_error = NO_ACTIVE_INDEX  # whatever failed before, this is what holds now
        return False
    index_row, model_row = rows
    if current is not None and current.index_name == index_row.name:
        return False
    if state.failed_version == index_row.name:
        return False  # already failed; keep serving the old pair until another version is promoted
    log.info("active index version is now %s (model %s): loading it", index_row.name, model_row.name)
    same_model = current is not None and current.model_name == model_row.name
    try:
        new = await asyncio.to_thread(load_deployment, settings, index_row, model_row,
                                      current.runner if same_model else None)
        if same_model:  # a compaction: the explain heatmaps' torch model carries over too
            new._torch_embedder = current._torch_embedder
        await asyncio.to_thread(swap_in, app, settings, new)
    except Exception as exc:  # the old pair keeps serving; the error is logged and in /readyz
        log.exception("loading index version %s failed; still serving %s", index_row.name,
                      getattr(current, "index_name", None))
        metrics.SWAPS.labels("failed").inc()
        state.failed_version = index_row.name
        if current is None:  # nothing served: /readyz's index line says why, not an older reason
            state.load_error = f"loading index version {index_row.name} failed: {exc.__class__.__name__}: {exc}"
        state.swap_error = {"index_version": index_row.name, "model_version": model_row.name,
                            "error": f"{exc.__class__.__name__}: {exc}", "at": utc_timestamp(datetime.now(UTC))}
        return False
    metrics.SWAPS.labels("ok").inc()
    log.info("now serving index %s with model %s (%d vectors)", new.index_name, new.model_name, len(new.index))
    return True


def converge_with_peers(app: FastAPI, settings: Settings) -> dict[str, int] | None:
    """Apply the adds and deletes other replicas made through the shared SQL store and data volume: SQL says
    which images are live, their embeddings are in the shared shard store (a replica writes one before its row
    commits). Under the write lock, so no local API write lands between reading SQL and changing the index."""
    state: ServingState = app.state.serving
    with state.write_lock:
        deployment: Deployment | None = app.state.deployment
        if deployment is None:
            return None
        try:
            return reconcile(settings, deployment, embed_from_files=False)
        except Exception as exc:  # the database went away: said once (database_failed), retried next poll
            if state.database_failed(exc, settings.resolved_database_url, serving=True):
                return None
            raise
