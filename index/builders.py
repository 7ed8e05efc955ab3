"""Building a VectorIndex from vectors: pick the type, train on a sample, fill, tune the search knobs.

Pure FAISS + numpy. `build` fills one index in memory; `build_ivf_ondisk` fills one copy of a trained IVF per
part (e.g. per slice of rows) and merges their inverted lists on disk. Both train and tune with the same
constants, in `_train` and `_tune`; `tune` finds the smallest nprobe / efSearch reaching a recall target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.vector_index import DEFAULT_RECALL_TARGET, VectorIndex, _as_float32, _as_ids, exact_knn

TRAIN_SIZE = 200_000  # vectors sampled to train IVF / PQ / OPQ
TUNE_QUERIES = 500  # indexed vectors used as queries when tuning nprobe / efSearch
TUNE_K = 10


class FactoryError(ValueError):
    """An index type FAISS cannot make for these vectors, said in one line before any work is spent on it."""


def check_factory(factory: str, dim: int, n: int | None = None) -> None:
    """Raise FactoryError when FAISS cannot make `factory` for `dim`-d vectors or, given `n`, when n vectors are
    too few to train it (an IVF needs one per list, a PQ one per centroid)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        # FAISS prefixes its reason with the C++ function and source line: keep the reason.
        reason = str(exc).strip().splitlines()[-1].rsplit(": ", 1)[-1] if str(exc).strip() else "no reason given"
        raise FactoryError(f"FAISS cannot make index type {factory!r} for {dim}-d vectors ({reason}); see "
                           "https://github.com/facebookresearch/faiss/wiki/The-index-factory, or leave the type "
                           "out and the build chooses one") from None
    if n is None:
        return
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    if isinstance(inner, faiss.IndexPreTransform):  # OPQ8,PQ8: the quantiser is behind the rotation
        inner = faiss.downcast_index(inner.index)
    pq = getattr(inner, "pq", None)
    needed = max(ivf.nlist if ivf is not None else 0, pq.ksub if pq is not None else 0)
    if n < needed:
        raise FactoryError(f"{factory} needs at least {needed} vectors to train, and there are {n}: choose a "
                           f"smaller type (e.g. {choose_factory(n, dim)} for this corpus) or leave the type out "
                           "and the build chooses one")


def _pow2(x: float) -> int:
    return int(2 ** max(0, round(math.log2(max(1.0, x)))))


def choose_factory(n: int, dim: int, memory_budget_bytes: int = 4 << 30) -> str:
    """Pick an index type from corpus size, dimension and memory budget (autofaiss-style rules).

    - up to 50k vectors: exact Flat (a brute-force scan is a few ms and recall is 1.0);
    - up to 2M vectors, when float32 vectors plus the graph fit: HNSW32 (best recall/speed on CPU);
    - otherwise IVF with ~4*sqrt(n) lists: IVF-Flat when the float32 vectors fit the budget, else OPQ + IVF-PQ
      with as many PQ bytes per vector as the budget allows (m divides dim).
    """
    raw = n * dim * 4
    if n <= 50_000 and raw <= memory_budget_bytes:
        return "Flat"
    hnsw_m = 32
    if n <= 2_000_000 and raw + n * (hnsw_m * 2 * 4 + 16) <= memory_budget_bytes:
        return f"HNSW{hnsw_m}"
    nlist = min(65536, _pow2(4 * math.sqrt(n)))
    # Keep >= 39 training points per list, FAISS's own lower bound for k-means.
    nlist = max(16, min(nlist, _pow2(n / 39)))
    if raw + n * 8 <= memory_budget_bytes:
        return f"IVF{nlist},Flat"
    per_vector = memory_budget_bytes / max(n, 1) - 8  # 8 bytes of id per vector
    candidates = [m for m in (8, 12, 16, 24, 32, 48, 64, 96) if dim % m == 0 and m <= per_vector]
    m = max(candidates) if candidates else next((m for m in (8, 4, 2, 1) if dim % m == 0), 1)
    return f"OPQ{m},IVF{nlist},PQ{m}"


def _drop_self(ids: np.ndarray, query_ids: np.ndarray | None) -> np.ndarray:
    """Remove each row's own query id (keeping order); rows lose at most one column."""
    if query_ids is None:
        return ids
    out = np.full((len(ids), ids.shape[1] - 1), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(ids, _as_ids(query_ids), strict=True)):
        kept = found[found != own][: out.shape[1]]
        out[row, : len(kept)] = kept
    return out


def tune(index: VectorIndex, queries: np.ndarray, true_ids: np.ndarray, k: int = 10,
         target: float = DEFAULT_RECALL_TARGET, query_ids: np.ndarray | None = None) -> dict[str, Any]:
    """Smallest nprobe / efSearch reaching `target` recall@k against `true_ids` (exact search); stored in
    index.params.

    query_ids: when the queries are indexed vectors themselves, their own ids are dropped from both
    result lists (leave-one-out), so the trivial self-match does not inflate the recall.
    """
    queries = _as_float32(queries)
    truth = _drop_self(true_ids, query_ids)
    k = min(k, truth.shape[1])
    truth = truth[:, :k]

    def recall() -> float:
        _, found = index.search(queries, k + (query_ids is not None))
        found = _drop_self(found, query_ids)[:, :k]
        hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True))
        return hits / max(1, int((truth >= 0).sum()))

    ivf, hnsw = index.ivf, index.hnsw
    if ivf is not None:
        knob, values = "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
                                  if v < ivf.nlist] + [ivf.nlist]
    elif hnsw is not None:
        knob, values = "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024]
    else:
        index.params.update(recall_at_k=1.0, tuned_k=k, recall_target=target)
        return index.params
    reached = 0.0
    for value in values:
        index.params[knob] = int(value)
        reached = recall()
        if reached >= target:
            break
    index.params.update(recall_at_k=round(reached, 4), tuned_k=k, recall_target=target,
                        tuned_queries=len(queries))
    return index.params


def _train(index: VectorIndex, vectors: np.ndarray, rng: np.random.Generator, train_size: int) -> None:
    n = len(vectors)
    if not index.is_trained and n:
        sample = rng.choice(n, size=train_size, replace=False) if n > train_size else slice(None)
        index.train(vectors[sample])


def _tune(index: VectorIndex, ids: np.ndarray, vectors: np.ndarray, rng: np.random.Generator,
          recall_target: float, tune_queries: int) -> None:
    """Tune nprobe / efSearch on a sample of the indexed vectors against exact search (leave-one-out)."""
    n = len(vectors)
    if n and index.kind != "flat":
        pick = rng.choice(n, size=min(n, tune_queries), replace=False)
        _, truth = exact_knn(vectors[pick], vectors, ids, TUNE_K + 1)
        tune(index, vectors[pick], truth, k=TUNE_K, target=recall_target, query_ids=ids[pick])


def build(ids: np.ndarray, vectors: np.ndarray, factory: str | None = None,
          memory_budget_bytes: int = 4 << 30, recall_target: float = DEFAULT_RECALL_TARGET,
          train_size: int = TRAIN_SIZE, tune_queries: int = TUNE_QUERIES, seed: int = 0) -> VectorIndex:
    """Build, train (on a sample), fill and tune an index from in-memory vectors."""
    vectors, ids = _as_float32(vectors), _as_ids(ids)
    n, dim = vectors.shape
    factory = factory or choose_factory(n, dim, memory_budget_bytes)
    index = VectorIndex(dim, factory)
    rng = np.random.default_rng(seed)
    _train(index, vectors, rng, train_size)
    index.add(ids, vectors)
    index.params["built_with"] = n
    _tune(index, ids, vectors, rng, recall_target, tune_queries)
    return index


Parts = Iterable[tuple[np.ndarray, np.ndarray]]


def fill_parts(trained: VectorIndex, parts: Parts) -> list[VectorIndex]:
    """One filled copy of the trained IVF per (ids, vectors) part, one after the other."""
    filled = []
    for part_ids, part_vectors in parts:
        part = VectorIndex(trained.dim, trained.factory, index=faiss.clone_index(trained.index))
        part.add(part_ids, part_vectors)
        filled.append(part)
    return filled


def build_ivf_ondisk(ids: np.ndarray, vectors: np.ndarray, parts: Parts,
                     factory: str, directory: str | Path, recall_target: float = DEFAULT_RECALL_TARGET,
                     train_size: int = TRAIN_SIZE, tune_queries: int = TUNE_QUERIES, seed: int = 0,
                     fill: Callable[[VectorIndex, Parts], list[VectorIndex]] = fill_parts) -> VectorIndex:
    """`build` for IVF types whose lists should live on disk: one IVF trained on a sample of `vectors`, one
    filled copy per (ids, vectors) part, merged into `directory`/merged.ivfdata (see merge_ivf_ondisk), tuned.
    `ids, vectors` are all the vectors of the parts together (the training and tuning sample). `fill` fills the
    copies: `fill_parts` here, or one that fans them out (a Ray build does, app/indexing/ray_build.py)."""
    vectors, ids = _as_float32(vectors), _as_ids(ids)
    trained = VectorIndex(vectors.shape[1], factory)
    if trained.ivf is None:
        raise TypeError(f"an on-disk build needs an IVF factory, got {factory!r}")
    rng = np.random.default_rng(seed)
    _train(trained, vectors, rng, train_size)
    merged = merge_ivf_ondisk(trained, fill(trained, parts), directory)
    merged.params["built_with"] = len(vectors)
    _tune(merged, ids, vectors, rng, recall_target, tune_queries)
    return merged


def merge_ivf_ondisk(trained: VectorIndex, parts: list[VectorIndex], directory: str | Path) -> VectorIndex:
    """Merge filled IVF indexes that share one trained quantizer into one index whose lists live on disk.

    FAISS's on-disk merge (faiss.contrib.ondisk.merge_ondisk): each part is written to `directory`, read back
    memory-mapped, and its inverted lists are merged into `merged.ivfdata` there; `VectorIndex.load` finds that
    file next to index.faiss even after the directory is renamed (IO_FLAG_ONDISK_SAME_DIR).
    """
    from faiss.contrib.ondisk import merge_ondisk

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if trained.ivf is None:
        raise TypeError("merge_ivf_ondisk needs IVF indexes")
    part_files = []
    for n, part in enumerate(parts):
        part_files.append(str(directory / f"part-{n:05d}.faiss"))
        faiss.write_index(part.index, part_files[-1])
    merge_ondisk(trained.index, part_files, str(directory / "merged.ivfdata"))
    for name in part_files:
        Path(name).unlink()
    trained._changed()
    return trained
