"""Per-call FAISS SearchParameters for a VectorIndex: the tuned nprobe / efSearch scaled by the request's effort
and by filter escalation, with an IDSelector. Built fresh for every call and passed as `params=`, so the shared
index object is never mutated and concurrent searches with different settings cannot race.

Efforts (EFFORTS):
- "fast":     a quarter of the tuned nprobe (at least 1), half the tuned efSearch (at least 8; FAISS still
              keeps k candidates);
- "balanced": the values tuned at build time (`builders.tune`), the default;
- "exact":    every vector scored: nprobe = nlist for IVF; on HNSW the caller scans the flat storage under the
              graph instead (VectorIndex.search); Flat is always exact. IVF-PQ still scores its compressed codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import faiss
import numpy as np

if TYPE_CHECKING:
    from index.vector_index import VectorIndex

EFFORTS = ("fast", "balanced", "exact")


def check_effort(effort: str) -> str:
    if effort not in EFFORTS:
        raise ValueError(f"effort must be one of {EFFORTS}, not {effort!r}")
    return effort


def knob(index: VectorIndex, effort: str) -> int:
    """The nprobe (IVF) or efSearch (HNSW) that `effort` asks for, before any filter escalation; 0 for Flat."""
    check_effort(effort)
    ivf, hnsw = index.ivf, index.hnsw
    if ivf is not None:
        tuned = int(index.params.get("nprobe", ivf.nprobe))
        return {"fast": max(1, tuned // 4), "balanced": tuned, "exact": ivf.nlist}[effort]
    if hnsw is not None:
        tuned = int(index.params.get("efSearch", hnsw.hnsw.efSearch))
        return max(8, tuned // 2) if effort == "fast" else tuned
    return 0


def search_params(index: VectorIndex, selector: faiss.IDSelector | None, scale: int = 1,
                  effort: str = "balanced") -> faiss.SearchParameters:
    ivf, hnsw = index.ivf, index.hnsw
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = min(ivf.nlist, knob(index, effort) * scale)
    elif hnsw is not None:
        params = faiss.SearchParametersHNSW()
        params.efSearch = knob(index, effort) * scale
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


def can_escalate(index: VectorIndex, scale: int, effort: str) -> bool:
    """Whether widening the knob by `scale` still scans more (a restrictive filter starves nprobe / efSearch)."""
    ivf, hnsw = index.ivf, index.hnsw
    if ivf is not None:
        return knob(index, effort) * scale < ivf.nlist
    if hnsw is not None:
        return knob(index, effort) * scale < min(max(index.ntotal, 64) * 2, 8192)
    return False


def faiss_search(index: faiss.Index, queries: np.ndarray, k: int, params: faiss.SearchParameters | None):
    """index.search with SearchParameters, immune to faiss.contrib.torch_utils.

    Importing that module (pytorch-metric-learning does, for evaluation) replaces every Index.search in the
    process with a torch-aware wrapper that drops the `params` argument; it keeps the original as search_numpy.
    """
    search = getattr(index, "search_numpy", None) or index.search
    return search(queries, k, params=params)


def faiss_range_search(index: faiss.Index, queries: np.ndarray, threshold: float,
                       params: faiss.SearchParameters | None):
    """index.range_search with SearchParameters (lims, scores, ids), immune to faiss.contrib.torch_utils."""
    search = getattr(index, "range_search_numpy", None) or index.range_search
    return search(queries, float(threshold), params=params)
