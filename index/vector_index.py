"""VectorIndex: a FAISS index over L2-normalised vectors (inner product = cosine) whose ids are images.id.

Pure FAISS + numpy. One class behind four index families, picked by a FAISS factory string:

- exact:    "Flat"                        (IndexIDMap2 over IndexFlatIP)
- HNSW:     "HNSW32"                      (IndexIDMap2 over IndexHNSWFlat)
- IVF-Flat: "IVF1024,Flat"                (IndexIVFFlat, native 64-bit ids)
- IVF-PQ:   "OPQ32,IVF4096,PQ32"          (IndexPreTransform(OPQ) over IndexIVFPQ, native ids)

index/builders.py picks one from the corpus size (`choose_factory`, autofaiss-style rules, written here
because autofaiss pins numpy<2), builds it (`build`, `build_ivf_ondisk`) and tunes it (`tune`).
Deletion is right for every type: Flat and IVF remove vectors for real; HNSW cannot, so removed ids become
tombstones, persisted with the index and applied through an IDSelector at
search time; a rebuild compacts them away.

Search-parameter knobs, stored in `params` (index.json) and applied on every search:
- "nprobe"   (IVF types): inverted lists scanned per query; tuned at build time by `builders.tune`.
- "efSearch" (HNSW): size of the dynamic candidate list; tuned at build time by `builders.tune`.
- "recall_target", "recall_at_k", "tuned_k", "tuned_queries": what the tuning aimed for and reached,
  measured against exact search on a sample of the indexed vectors.
Filtered searches (allowed_ids / exclude_ids) escalate nprobe / efSearch when too few results come back, so
they still return k results when k matching vectors exist.

Effort per call (`effort=`: fast, balanced, exact) scales those knobs in the SearchParameters of that one call
(index/search_params.py), never on the shared index, so concurrent searches cannot disturb each other.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.search_params import (
    can_escalate,
    check_effort,
    faiss_range_search,
    faiss_search,
    knob,
    search_params,
)

INDEX_FILE = "index.faiss"
PARAMS_FILE = "index.json"
TOMBSTONES_FILE = "tombstones.npy"

DEFAULT_RECALL_TARGET = 0.95
# HNSW searches filtered to at most this many ids score them exactly instead of walking the graph.
EXACT_FILTER_MAX = 20_000
# A write makes the GPU copy stale; it is made again on a later search, at most this often (a copy of a large
# index takes a while, and a stream of API adds should not cost one per search). Meanwhile the CPU index serves.
GPU_RECOPY_INTERVAL_S = 5.0
# Ids removed from the CPU index that a GPU copy may still hold and drop at search time (faiss-gpu cannot remove
# ids); past this many the copy is remade instead, so the over-fetch stays small.
GPU_REMOVED_MAX = 256
# faiss-gpu selects at most 2048 results (and probes at most 2048 IVF lists) per query: GPU_MAX_SELECTION_K.
GPU_MAX_K = 2048

log = logging.getLogger(__name__)


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    return vectors


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)


def gpu_available() -> bool:
    """True when this FAISS build (faiss-gpu, the `gpu` extra) sees a GPU."""
    return gpu_unavailable_reason() is None


def gpu_unavailable_reason() -> str | None:
    """Why this FAISS build cannot search on a GPU, or None when it can."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "this FAISS build has no GPU support; the `gpu` extra installs faiss-gpu-cu12"
    if faiss.get_num_gpus() == 0:
        return "faiss-gpu sees no GPU (CUDA_VISIBLE_DEVICES, the driver, or a CUDA version it was not built for)"
    return None


def _copy_to_gpus(index: faiss.Index, resources: list[Any]) -> faiss.Index:
    """A copy of `index` on every GPU. `resources` (one StandardGpuResources per GPU: temporary and pinned memory,
    cuBLAS handles) is filled on the first copy and reused by the later ones. It belongs to one VectorIndex:
    faiss-gpu's resources are not thread-safe, and each index is searched under its own deployment's lock."""
    if not resources:
        resources.extend(faiss.StandardGpuResources() for _ in range(faiss.get_num_gpus()))
    options = faiss.GpuMultipleClonerOptions()
    # Flat stores float16 (half the GPU memory) and IVF-PQ computes its lookup tables in float16 (IVF-Flat stays
    # float32): scores move by ~1e-3, so "exact" effort stays on the CPU index.
    options.useFloat16 = True
    return faiss.index_cpu_to_gpu_multiple_py(resources, index, co=options)


def _set_gpu_nprobe(index: faiss.Index, nprobe: int) -> None:
    # On the shared GPU copy, not per call: safe because Deployment.index_lock serialises searches.
    faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)


def _cap_opq_training(index: faiss.Index) -> None:
    """OPQ's defaults (50 rounds on 65k points) take many minutes on CPU; 4 rounds on 16k keep most of the gain."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = 4
                transform.max_train_points = 16384


class VectorIndex:
    """Inner-product FAISS index with 64-bit ids, built from a factory string ("Flat" by default)."""

    def __init__(self, dim: int, factory: str = "Flat", index: faiss.Index | None = None,
                 params: dict[str, Any] | None = None, tombstones: np.ndarray | None = None) -> None:
        self.dim = dim
        self.factory = factory
        self.params: dict[str, Any] = dict(params or {})
        if index is None:
            base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            _cap_opq_training(base)
            # IVF types take ids natively (and must, so remove_ids and shard merges see images.id);
            # Flat and HNSW need the IDMap2 wrapper.
            native_ids = faiss.try_extract_index_ivf(base) is not None or factory.startswith("IDMap")
            index = base if native_ids else faiss.IndexIDMap2(base)
        self.index = index
        self.tombstones = np.unique(_as_ids(tombstones if tombstones is not None else []))
        self._ids_cache: np.ndarray | None = None
        self._sorted_ids: np.ndarray | None = None
        self._gpu_index: faiss.Index | None = None
        self._gpu_removed = np.zeros(0, dtype=np.int64)  # removed here since the copy, still held by the copy
        self._gpu_resources: list[Any] = []  # filled by the first copy (_copy_to_gpus)
        self._gpu_wanted = False
        self._gpu_copied_at = 0.0
        self._gpu_refused: str | None = None  # why to_gpu() could not move this index
        self._gpu_error: str | None = None  # the last copy's failure, until a copy succeeds

    # -- introspection --------------------------------------------------------------------------------
    @property
    def ivf(self) -> faiss.IndexIVF | None:
        return faiss.try_extract_index_ivf(self.index)

    @property
    def hnsw(self) -> faiss.IndexHNSW | None:
        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "id_map") else self.index
        return inner if isinstance(inner, faiss.IndexHNSW) else None

    @property
    def kind(self) -> str:
        """'hnsw', 'ivf' or 'flat'."""
        if self.hnsw is not None:
            return "hnsw"
        return "ivf" if self.ivf is not None else "flat"

    @property
    def supports_remove(self) -> bool:
        return self.hnsw is None

    def __len__(self) -> int:
        """Live vectors: those held minus tombstones."""
        return int(self.index.ntotal) - len(self.tombstones)

    @property
    def ntotal(self) -> int:
        """Vectors physically held, tombstoned ones included."""
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def ids(self) -> np.ndarray:
        """Every id physically held (tombstoned ones included), in storage order."""
        if self._ids_cache is None:
            if hasattr(self.index, "id_map"):
                self._ids_cache = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            else:
                self._ids_cache = self._ivf_ids()
        return self._ids_cache

    def live_ids(self) -> np.ndarray:
        ids = self.ids()
        if len(self.tombstones) == 0:
            return ids
        return ids[~np.isin(ids, self.tombstones)]

    def _ivf_ids(self) -> np.ndarray:
        ivf = self.ivf
        if ivf is None:
            raise TypeError(f"cannot list ids of {type(self.index).__name__}")
        invlists, out = ivf.invlists, []
        for list_no in range(ivf.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                out.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        if self._sorted_ids is None:
            self._sorted_ids = np.sort(self.ids())
        held = self._sorted_ids
        if len(held) == 0:
            return np.zeros(len(ids), dtype=bool)
        pos = np.clip(np.searchsorted(held, ids), 0, len(held) - 1)
        return held[pos] == ids

    def _changed(self) -> None:
        self._ids_cache = self._sorted_ids = None

    def _gpu_stale(self) -> None:
        """The GPU copy cannot follow a write: a later search makes it again (_gpu_copy)."""
        self._gpu_index = None
        self._gpu_removed = np.zeros(0, dtype=np.int64)

    def to_gpu(self) -> bool:
        """Search on all GPUs (faiss-gpu, the `gpu` extra) from now on, for Flat and IVF types.

        HNSW has no GPU version; filtered searches (allowed_ids), "exact" effort and range searches stay on the
        CPU index, which stays the one written to. New ids are added to the GPU copy as well, and removed ones
        stay on it, dropped from its results (up to GPU_REMOVED_MAX); past that, or after a replaced vector or a
        removed id added back, the copy is made again on a later search, at most every GPU_RECOPY_INTERVAL_S
        (under the caller's lock, so that search waits for it); so is a copy that failed (out of GPU memory while a hot
        swap holds two versions, say), the CPU index answering meanwhile. False when this FAISS build has no GPU or the
        type cannot move. `placement()` says where searches run now, and why.
        """
        self._gpu_refused = "HNSW has no GPU version" if self.kind == "hnsw" else gpu_unavailable_reason()
        if self._gpu_refused is not None:
            return False
        self._gpu_wanted = True
        self._gpu_copy(force=True)
        return True

    @property
    def on_gpu(self) -> bool:
        """Whether to_gpu succeeded: unfiltered searches below "exact" effort go to a GPU copy (remade after
        writes and failures), the rest to the CPU index."""
        return self._gpu_wanted

    def placement(self) -> str:
        """Where searches run, in words: "gpu", "cpu" (never asked to move), or "cpu (why not the GPU)"."""
        if self._gpu_wanted and self._gpu_error is None:
            return "gpu"
        if self._gpu_wanted:
            return (f"cpu (copying it to the GPU failed: {self._gpu_error}; tried again every "
                    f"{GPU_RECOPY_INTERVAL_S:g} s)")
        return "cpu" if self._gpu_refused is None else f"cpu ({self._gpu_refused})"

    def _gpu_copy(self, force: bool = False) -> faiss.Index | None:
        if self._gpu_index is None and self._gpu_wanted and self.index.ntotal:
            now = time.monotonic()
            if force or now - self._gpu_copied_at >= GPU_RECOPY_INTERVAL_S:
                self._gpu_copied_at = now  # a failed copy, too, is tried again only after the interval
                try:
                    self._gpu_index = _copy_to_gpus(self.index, self._gpu_resources)
                    self._gpu_removed = np.zeros(0, dtype=np.int64)
                    self._gpu_error = None
                except Exception as exc:  # GPU memory, a layout faiss-gpu cannot hold: the CPU index answers
                    self._gpu_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
                    log.warning("copying the index to the GPU failed (%s); the CPU index answers, next try in "
                                "%g s", self._gpu_error, GPU_RECOPY_INTERVAL_S)
        return self._gpu_index

    # -- writes ---------------------------------------------------------------------------------------
    def train(self, vectors: np.ndarray) -> None:
        if not self.index.is_trained:
            self.index.train(_as_float32(vectors))

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add vectors; an id already held is replaced (Flat/IVF) or refused (HNSW: rebuild instead)."""
        vectors, ids = _as_float32(vectors), _as_ids(ids)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"{len(ids)} ids for vectors of shape {vectors.shape}, dim {self.dim}")
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add() call")
        if self.index.ntotal:
            present = ids[self._contains(ids)]
            if len(present):
                if not self.supports_remove:
                    raise ValueError(f"ids already in this HNSW index (tombstoned or live): {present[:10]}; "
                                     "HNSW cannot replace vectors, rebuild the index instead")
                self.remove(present)
        self.train(vectors)
        self.index.add_with_ids(vectors, ids)
        self._changed()
        if self._gpu_index is None:
            return
        if np.isin(ids, self._gpu_removed).any():  # replaced or re-added: the copy holds its old vector too
            self._gpu_stale()
            return
        # New ids go onto the GPU copy too, so a stream of uploads does not remake it every few seconds.
        try:
            self._gpu_index.add_with_ids(vectors, ids)
        except Exception as exc:
            log.warning("adding to the GPU copy failed (%s: %s); it is made again", exc.__class__.__name__, exc)
            self._gpu_stale()

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ids; returns how many live vectors went away. HNSW records tombstones instead."""
        ids = np.unique(_as_ids(ids))
        if len(ids) == 0 or self.index.ntotal == 0:
            return 0
        if self.supports_remove:
            # Only with a copy to keep: listing the ids held walks every IVF list.
            held = ids[self._contains(ids)] if self._gpu_index is not None else ids[:0]
            removed = int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
            self._changed()
            if self._gpu_index is not None:
                # The copy keeps them (faiss-gpu cannot remove ids) and drops them from its results, up to a bound.
                self._gpu_removed = np.union1d(self._gpu_removed, held)
                if len(self._gpu_removed) > GPU_REMOVED_MAX:
                    self._gpu_stale()
            return removed
        fresh = ids[self._contains(ids) & ~np.isin(ids, self.tombstones)]
        self.tombstones = np.union1d(self.tombstones, fresh)
        return len(fresh)

    def add_or_revive(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """`add` for images that may come back after a delete: on HNSW an id held as a tombstone is revived
        (its stored vector is the one it had; ids are content-addressed, so the image is the same one)."""
        ids, vectors = _as_ids(ids), _as_float32(vectors)
        if not self.supports_remove and len(self.tombstones):
            revive = np.isin(ids, self.tombstones)
            if revive.any():
                self.tombstones = np.setdiff1d(self.tombstones, ids[revive])
                ids, vectors = ids[~revive], vectors[~revive]
        if len(ids):
            self.add(ids, vectors)

    def reconstruct(self, image_id: int) -> np.ndarray | None:
        """The stored vector of a live id when this index type keeps it (Flat, HNSW), else None (IVF-PQ codes,
        IVF without a direct map, an id not held)."""
        image_id = int(image_id)
        if np.isin(image_id, self.tombstones):
            return None
        try:
            return np.asarray(self.index.reconstruct(image_id), dtype=np.float32)
        except (RuntimeError, AttributeError):
            return None

    # -- search ---------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, allowed_ids: np.ndarray | None = None,
               exclude_ids: np.ndarray | None = None, effort: str = "balanced") -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each [Q, k]; missing neighbours have id -1 and score -inf.

        allowed_ids restricts the search to those ids (e.g. selected in SQL by label or metadata);
        exclude_ids (e.g. images deleted since the index was built) and tombstones never come back.
        effort: fast, balanced or exact (index/search_params.py), applied to this call only.
        """
        check_effort(effort)
        queries = _as_float32(queries)
        nq = len(queries)
        empty = (np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64))
        if self.index.ntotal == 0 or k <= 0:
            return empty
        excluded = self.tombstones
        if exclude_ids is not None and len(exclude_ids):
            excluded = np.union1d(excluded, _as_ids(exclude_ids))
        if allowed_ids is None and effort != "exact" and self._gpu_wanted:
            found = self._search_gpu(queries, k, excluded, effort)
            if found is not None:
                return found
        selector: faiss.IDSelector | None = None
        keep: list[Any] = []  # SWIG selectors do not own their children: keep them alive here
        if allowed_ids is not None:
            allowed = np.unique(_as_ids(allowed_ids))
            allowed = allowed[self._contains(allowed) & ~np.isin(allowed, excluded)]
            available = len(allowed)
            if available == 0:
                return empty
            if self.hnsw is not None and available <= EXACT_FILTER_MAX:
                # A graph walk restricted to a small subset wastes most of its steps: score the subset exactly.
                return self._exact_subset(queries, k, allowed)
            selector = faiss.IDSelectorBatch(allowed)
        elif len(excluded):
            available = self.ntotal - int(self._contains(excluded).sum())
            inner = faiss.IDSelectorBatch(excluded)
            keep.append(inner)
            selector = faiss.IDSelectorNot(inner)
        else:
            available = self.ntotal
        wanted = min(k, available)
        if effort == "exact" and self.hnsw is not None:
            return self._scan_hnsw_storage(queries, k, selector)
        scale = 1
        while True:
            scores, ids = faiss_search(self.index, queries, k, search_params(self, selector, scale, effort))
            short = (ids >= 0).sum(axis=1) < wanted
            if selector is None or not short.any() or not can_escalate(self, scale, effort):
                break
            scale *= 4  # a restrictive filter starves nprobe/efSearch: widen until k results come back
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids

    def _search_gpu(self, queries: np.ndarray, k: int, excluded: np.ndarray,
                    effort: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-k on the GPU copy; excluded ids are over-fetched and dropped here (faiss-gpu takes no IDSelector).
        None (the CPU index answers) when the copy is stale, when k plus the excluded ids held exceed what the GPU
        can select, when the effort probes more IVF lists than it can, or when dropping the excluded ids left a
        query short of results the CPU path would find."""
        held_excluded = int(self._contains(excluded).sum()) if len(excluded) else 0
        if k + held_excluded + len(self._gpu_removed) > GPU_MAX_K:
            return None
        nprobe = min(self.ivf.nlist, knob(self, effort)) if self.ivf is not None else 0
        if nprobe > GPU_MAX_K:  # more lists than faiss-gpu probes: capping would cost recall, the CPU answers
            return None
        gpu_index = self._gpu_copy()  # a new copy holds no removed id
        if gpu_index is None:
            return None
        if nprobe:
            _set_gpu_nprobe(gpu_index, nprobe)
        # Ids removed here since the copy was made are still on it: dropped like the excluded ones.
        drop = np.union1d(excluded, self._gpu_removed) if len(self._gpu_removed) else excluded
        scores, ids = gpu_index.search(queries, k + held_excluded + len(self._gpu_removed))
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        if len(drop):
            dropped = np.isin(ids, drop)
            # Stable sort moves dropped entries to the end of each row, keeping the others in rank order.
            rows = np.arange(len(ids))[:, None]
            order = np.argsort(dropped, axis=1, kind="stable")
            ids, scores = np.where(dropped, -1, ids)[rows, order], np.where(dropped, -np.inf, scores)[rows, order]
            wanted = min(k, self.ntotal - held_excluded)
            if ((ids[:, :k] >= 0).sum(axis=1) < wanted).any():
                return None  # excluded ids filled the probed IVF lists: the CPU index widens nprobe instead
        return scores[:, :k], ids[:, :k]

    def _scan_hnsw_storage(self, queries: np.ndarray, k: int,
                           selector: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k on HNSW: a brute-force scan of the flat storage under the graph, ids mapped back."""
        hnsw = self.hnsw
        storage = faiss.downcast_index(hnsw.storage)
        params = faiss.SearchParameters()
        if selector is not None:  # the selector speaks image ids; the storage, positions
            params.sel = faiss.IDSelectorTranslated(self.index.id_map, selector)
        scores, positions = faiss_search(storage, queries, k, params)
        held = self.ids()
        ids = np.where(positions >= 0, held[np.clip(positions, 0, None)], -1)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids

    def range_search(self, queries: np.ndarray, threshold: float, *, exclude_ids: np.ndarray | None = None,
                     effort: str = "balanced") -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query, every (scores, ids) scoring above `threshold` (cosine), best first: FAISS's range
        search with the same per-call knobs as `search` (HNSW and IVF find what their candidate lists reach)."""
        queries = _as_float32(queries)
        if self.index.ntotal == 0 or len(queries) == 0:
            return [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in range(len(queries))]
        excluded = self.tombstones
        if exclude_ids is not None and len(exclude_ids):
            excluded = np.union1d(excluded, _as_ids(exclude_ids))
        keep: list[Any] = []
        selector = None
        if len(excluded):
            inner = faiss.IDSelectorBatch(excluded)
            keep.append(inner)
            selector = faiss.IDSelectorNot(inner)
        check_effort(effort)
        params = search_params(self, selector, 1, "balanced" if effort == "exact" and self.hnsw else effort)
        lims, scores, ids = faiss_range_search(self.index, queries, threshold, params)
        out = []
        for q in range(len(queries)):
            s, i = scores[lims[q]:lims[q + 1]], ids[lims[q]:lims[q + 1]].astype(np.int64)
            order = np.argsort(-s, kind="stable")
            out.append((s[order].astype(np.float32), i[order]))
        return out

    def _exact_subset(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.vstack([self.index.reconstruct(int(i)) for i in ids]).astype(np.float32)
        scores, ids_out = exact_knn(queries, vectors, ids, k)
        pad = k - ids_out.shape[1]
        if pad > 0:
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids_out = np.pad(ids_out, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), ids_out

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".index.", dir=directory)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, directory / INDEX_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        tmp_tomb = directory / ".tombstones.tmp.npy"
        np.save(tmp_tomb, self.tombstones)
        os.replace(tmp_tomb, directory / TOMBSTONES_FILE)
        meta = {"dim": self.dim, "factory": self.factory, "kind": self.kind, "params": self.params,
                "ntotal": self.ntotal, "live": len(self), "tombstones": len(self.tombstones)}
        tmp_meta = directory / f".{PARAMS_FILE}.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, directory / PARAMS_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False) -> VectorIndex:
        directory = Path(directory)
        meta = json.loads((directory / PARAMS_FILE).read_text())
        # ONDISK_SAME_DIR: an index merged on disk finds its .ivfdata next to it even after a rename.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0)
        index = faiss.read_index(str(directory / INDEX_FILE), flags)
        tomb_path = directory / TOMBSTONES_FILE
        tombstones = np.load(tomb_path) if tomb_path.exists() else None
        return cls(dim=meta["dim"], factory=meta["factory"], index=index, params=meta.get("params"),
                   tombstones=tombstones)


def exact_knn(queries: np.ndarray, database: np.ndarray, db_ids: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """Exact inner-product top-k of queries against (db_ids, database): the ground truth for tuning."""
    scores, positions = faiss.knn(_as_float32(queries), _as_float32(database), min(k, len(database)),
                                  metric=faiss.METRIC_INNER_PRODUCT)
    ids = np.where(positions >= 0, _as_ids(db_ids)[np.clip(positions, 0, None)], -1)
    return scores, ids
