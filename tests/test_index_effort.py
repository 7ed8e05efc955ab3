"""Effort per search call (index/search_params.py): exact equals a Flat search on every index type that keeps
its vectors, fast scans less than balanced, and concurrent searches with different efforts on one shared index
give each exactly what it gives alone (the knobs travel in per-call SearchParameters, the index is not touched).
Range search (near-duplicates) on each type. Pure FAISS on random vectors: no app, no database."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from index.builders import tune
from index.vector_index import VectorIndex


def unit(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    vectors = unit(rng, 4000)
    ids = np.arange(1, 4001, dtype=np.int64) * 3  # ids are not positions
    return ids, vectors, unit(rng, 40)


def built(factory: str, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    index = VectorIndex(32, factory)
    index.train(vectors)
    index.add(ids, vectors)
    truth = _flat(ids, vectors).search(vectors[:100], 11)[1]
    tune(index, vectors[:100], truth, k=10, target=0.6, query_ids=ids[:100])  # low on purpose: efforts differ
    return index


def _flat(ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    flat = VectorIndex(32, "Flat")
    flat.add(ids, vectors)
    return flat


@pytest.mark.parametrize("factory", ["HNSW32", "IVF64,Flat"])
def test_exact_effort_equals_flat_and_fast_scans_less(factory: str, data) -> None:
    ids, vectors, queries = data
    index, flat = built(factory, ids, vectors), _flat(ids, vectors)
    truth_scores, truth = flat.search(queries, 10)
    exact_scores, exact = index.search(queries, 10, effort="exact")
    assert np.array_equal(exact, truth)
    np.testing.assert_allclose(exact_scores, truth_scores, rtol=1e-5)

    def recall(found: np.ndarray) -> float:
        return np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])

    fast, balanced = (recall(index.search(queries, 10, effort=e)[1]) for e in ("fast", "balanced"))
    assert fast <= balanced < 1.0  # tuned to 0.6 on purpose: the efforts differ
    # Exact with a filter and with deleted ids still matches Flat restricted the same way.
    allowed, gone = ids[::5], ids[:40]
    index.remove(gone)
    flat.remove(gone)
    assert np.array_equal(index.search(queries, 5, allowed_ids=allowed, effort="exact")[1],
                          flat.search(queries, 5, allowed_ids=allowed)[1])
    assert np.array_equal(index.search(queries, 5, effort="exact")[1], flat.search(queries, 5)[1])
    with pytest.raises(ValueError, match="effort"):
        index.search(queries, 5, effort="warp")


def test_concurrent_searches_with_different_efforts_do_not_disturb_each_other(data) -> None:
    ids, vectors, queries = data
    index = built("IVF64,Flat", ids, vectors)
    tuned = dict(index.params)
    alone = {e: index.search(queries, 10, effort=e) for e in ("fast", "balanced", "exact")}
    jobs = [("fast", "balanced", "exact")[i % 3] for i in range(150)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda e: (e, index.search(queries, 10, effort=e)), jobs))
    for effort, (scores, found) in results:
        assert np.array_equal(found, alone[effort][1]), effort
        np.testing.assert_array_equal(scores, alone[effort][0])
    assert index.params == tuned and index.ivf.nprobe == 1  # the shared index was never changed


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,Flat"])
def test_range_search_finds_near_copies_only(factory: str, data) -> None:
    ids, vectors, _ = data
    rng = np.random.default_rng(1)
    copies = vectors[:20] + rng.normal(scale=0.02, size=(20, 32)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    copy_ids = np.arange(100_001, 100_021, dtype=np.int64)
    index = built(factory, np.concatenate([ids, copy_ids]), np.vstack([vectors, copies]))
    found = index.range_search(vectors[:20], 0.9, effort="balanced")
    for n, (scores, hits) in enumerate(found):
        assert set(hits.tolist()) == {ids[n], copy_ids[n]}, (n, hits, scores)
        assert list(scores) == sorted(scores, reverse=True)
    index.remove(copy_ids[:5])  # HNSW: tombstones, which range search skips too
    gone = index.range_search(vectors[:10], 0.9, exclude_ids=copy_ids[5:10])
    assert all(set(h.tolist()) == {ids[n]} for n, (_, h) in enumerate(gone))
