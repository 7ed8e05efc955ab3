"""VectorIndex: every index type deletes correctly (HNSW via tombstones), filters return k results, tuning,
the automatic type choice, persistence and FAISS's on-disk IVF merge."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import versions
from index.builders import build, choose_factory, merge_ivf_ondisk
from index.vector_index import VectorIndex, exact_knn, gpu_available

TYPES = ["Flat", "HNSW16", "IVF16,Flat", "OPQ8,IVF16,PQ8x4"]
DIM = 32


def clustered(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(1000, 3000, dtype=np.int64)  # ids are images.id, not positions
    return ids, clustered(len(ids))


def built(factory: str, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    index = VectorIndex(DIM, factory)
    index.train(vectors)
    index.add(ids, vectors)
    index.params["nprobe" if index.ivf is not None else "efSearch"] = 16 if index.ivf is not None else 64
    return index


@pytest.mark.parametrize("factory", TYPES)
def test_deleted_ids_never_come_back(factory: str, data, tmp_path: Path) -> None:
    ids, vectors = data
    index = built(factory, ids, vectors)
    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0  # idempotent
    assert len(index) == len(ids) - len(gone)
    if factory.startswith("HNSW"):
        assert not index.supports_remove and len(index.tombstones) == len(gone)
    for idx in (index, VectorIndex.load(index.save(tmp_path / "v"))):
        # Query with the deleted vectors themselves: the worst case for leaking them.
        _, found = idx.search(vectors[::3][:200], 10)
        assert not np.isin(found, gone).any()
        assert (found >= 0).all()  # still k results
        assert np.isin(idx.live_ids(), gone).sum() == 0
    excluded = ids[1::3][:50]
    _, found = index.search(vectors[1::3][:50], 10, exclude_ids=excluded)
    assert not np.isin(found, np.concatenate([gone, excluded])).any() and (found >= 0).all()


@pytest.mark.parametrize("factory", TYPES)
def test_filtered_search_returns_k_matches(factory: str, data) -> None:
    ids, vectors = data
    index = built(factory, ids, vectors)
    rng = np.random.default_rng(1)
    allowed = rng.choice(ids, size=25, replace=False)  # ~1% of the corpus: starves nprobe/efSearch
    scores, found = index.search(vectors[:20], 10, allowed_ids=allowed)
    assert np.isin(found, allowed).all(), "every result is an allowed id, and there are k of them"
    assert np.isfinite(scores).all()
    if factory in ("Flat", "IVF16,Flat"):  # escalation ends in an exact scan over the allowed ids
        truth_pos = np.argsort(-(vectors[:20] @ vectors[np.isin(ids, allowed)].T), axis=1)[:, :10]
        assert (found == ids[np.isin(ids, allowed)][truth_pos]).mean() > 0.95
    few = allowed[:4]
    _, found = index.search(vectors[:5], 10, allowed_ids=few)
    assert (np.sort(found[:, :4], axis=1) == np.sort(few)).all() and (found[:, 4:] == -1).all()
    index.remove(few[:2])
    _, found = index.search(vectors[:5], 10, allowed_ids=few, exclude_ids=few[2:3])
    assert set(found[0].tolist()) == {int(few[3]), -1}


def test_hnsw_refuses_to_replace_and_others_upsert(data) -> None:
    ids, vectors = data
    hnsw = built("HNSW16", ids[:100], vectors[:100])
    hnsw.remove(ids[:1])
    with pytest.raises(ValueError, match="rebuild"):
        hnsw.add(ids[:1], vectors[:1])
    flat = built("Flat", ids[:100], vectors[:100])
    flat.add(ids[:1], vectors[5:6])  # replaces
    assert len(flat) == 100
    _, found = flat.search(vectors[5:6], 2)
    assert set(found[0].tolist()) == {int(ids[0]), int(ids[5])}


@pytest.mark.parametrize("factory", TYPES)
def test_a_deleted_id_comes_back_and_stored_vectors_are_given_back(data, factory: str) -> None:
    ids, vectors = data
    index = built(factory, ids[:400], vectors[:400])
    index.remove(ids[:1])
    assert index.reconstruct(ids[0]) is None  # deleted: not given back
    index.add_or_revive(ids[:1], vectors[:1])  # HNSW revives its tombstone, the others re-add
    assert len(index) == 400
    _, found = index.search(vectors[:1], 10)
    assert ids[0] in found[0]  # PQ codes are lossy: among the nearest, not always first
    again = index.reconstruct(ids[0])
    if index.kind in ("flat", "hnsw"):
        assert again is not None and np.allclose(again, vectors[0], atol=1e-6)
    assert index.reconstruct(999_999) is None  # never held


def test_tuning_reaches_the_recall_target_and_is_stored(tmp_path: Path) -> None:
    everything = clustered(6200, seed=3)
    vectors, queries = everything[:6000], everything[6000:]  # held-out queries from the same distribution
    ids = np.arange(len(vectors), dtype=np.int64) + 1
    for factory, knob in (("IVF64,Flat", "nprobe"), ("HNSW16", "efSearch")):
        index = build(ids, vectors, factory, recall_target=0.97, tune_queries=200)
        assert index.params[knob] >= 1 and index.params["recall_at_k"] >= 0.97
        loaded = VectorIndex.load(index.save(tmp_path / factory))
        assert loaded.params[knob] == index.params[knob]
        _, truth = exact_knn(queries, vectors, ids, 10)
        _, found = loaded.search(queries, 10)
        recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
        assert recall >= 0.9


def test_choose_factory_rules() -> None:
    gib = 1 << 30
    assert choose_factory(10_000, 384, 4 * gib) == "Flat"
    assert choose_factory(500_000, 384, 4 * gib) == "HNSW32"
    assert choose_factory(5_000_000, 384, 16 * gib).startswith("IVF") and choose_factory(
        5_000_000, 384, 16 * gib).endswith(",Flat")
    pq = choose_factory(100_000_000, 384, 8 * gib)
    assert pq.startswith("OPQ") and ",PQ" in pq
    m = int(pq.split(",PQ")[1])
    assert 384 % m == 0 and 100_000_000 * (m + 8) <= 8 * gib
    for factory in (choose_factory(n, 64, 64 << 20) for n in (1000, 100_000, 2_000_000)):
        VectorIndex(64, factory)  # every choice is a valid factory string


def test_ivf_ondisk_merge_equals_single_index(tmp_path: Path, data) -> None:
    ids, vectors = data
    trained = VectorIndex(DIM, "IVF16,Flat")
    trained.train(vectors)
    parts = []
    for part_ids, part_vecs in ((ids[:700], vectors[:700]), (ids[700:], vectors[700:])):
        part = VectorIndex(DIM, "IVF16,Flat", index=faiss.clone_index(trained.index))
        part.add(part_ids, part_vecs)
        parts.append(part)
    merged = merge_ivf_ondisk(trained, parts, tmp_path / "work")
    merged.params["nprobe"] = 16
    merged.save(tmp_path / "work")
    os.rename(tmp_path / "work", tmp_path / "published")  # the .ivfdata must be found after the rename
    loaded = VectorIndex.load(tmp_path / "published")
    assert sorted(loaded.ids().tolist()) == ids.tolist()
    _, found = loaded.search(vectors[:50], 5)
    _, truth = exact_knn(vectors[:50], vectors, ids, 5)
    assert (found == truth).mean() > 0.98


def test_embedding_shards_roundtrip_and_ignore_half_written(tmp_path: Path) -> None:
    store = tmp_path / "emb"
    vectors = clustered(10)
    versions.write_embedding_shard(store, "a", np.arange(5), vectors[:5])
    versions.write_embedding_shard(store, "b", np.arange(3, 10), vectors[3:])
    np.save(store / f"c{versions.VEC_SUFFIX}", vectors)  # a crash before the ids file: not a shard
    ids, loaded = versions.load_embeddings(store, keep=np.arange(2, 10))
    assert ids.tolist() == list(range(2, 10)) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, vectors[2:], atol=2e-3)
    assert versions.embedded_ids(store).tolist() == list(range(10))


class Killed(BaseException):
    """Stands in for kill -9 at one file operation (BaseException: no `except Exception` catches it)."""


def _many_small_shards(store: Path, n: int) -> np.ndarray:
    vectors = clustered(n)
    versions.write_embedding_shard(store, "run-1", np.arange(100, 110), clustered(10, seed=3))  # not folded
    for i in range(n):
        versions.write_embedding_shard(store, f"api-{i + 1:012d}-t", np.array([i + 1]), vectors[i : i + 1])
    return vectors


@pytest.mark.parametrize("kill_at", range(14))
def test_fold_shards_is_crash_safe_at_every_step(tmp_path: Path, monkeypatch, kill_at: int) -> None:
    """A fold killed at any file operation leaves every row counted exactly once; the next fold finishes it."""
    store = tmp_path / "emb"
    _many_small_shards(store, 5)
    sources = [s for s in versions.shard_stems(store) if s.startswith("api-")]
    before_ids, before = versions.load_embeddings(store)
    calls = {"n": 0}
    real_replace, real_unlink = os.replace, Path.unlink

    def step(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at + 1:
                raise Killed()
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(versions.os, "replace", step(real_replace))
    monkeypatch.setattr(Path, "unlink", step(real_unlink))
    try:
        versions.fold_shards(store, sources, "api-000000000000-merged-1")
    except Killed:
        pass
    monkeypatch.undo()
    counted = np.concatenate([np.load(store / f"{s}{versions.IDS_SUFFIX}") for s in versions.shard_stems(store)])
    assert len(counted) == len(np.unique(counted)) == len(before_ids)
    ids, loaded = versions.load_embeddings(store)
    assert np.array_equal(ids, before_ids) and np.array_equal(loaded, before)
    # The next fold (over what is left) ends with one API shard and no file of the folded ones.
    versions.fold_shards(store, [s for s in versions.shard_stems(store) if s.startswith("api-")],
                         "api-000000000000-merged-2")
    assert [s for s in versions.shard_stems(store) if s.startswith("api-")] == ["api-000000000000-merged-2"]
    assert not [p for p in store.iterdir() if p.name.startswith(tuple(sources)) or "merged-1" in p.name]
    ids, loaded = versions.load_embeddings(store)
    assert np.array_equal(ids, before_ids) and np.array_equal(loaded, before)


def test_fold_keeps_the_latest_row_and_drops_what_it_is_told(tmp_path: Path) -> None:
    store = tmp_path / "emb"
    vectors = _many_small_shards(store, 4)
    versions.write_embedding_shard(store, "api-000000000002-u", np.array([2]), vectors[3:4])  # 2 re-embedded
    sources = [s for s in versions.shard_stems(store) if s.startswith("api-")]
    written = versions.fold_shards(store, sources, "api-000000000000-merged-1",
                                   drop=lambda ids, written_at: ids == 4)
    assert written == 3
    ids, loaded = versions.load_embeddings(store, keep=np.arange(1, 5))
    assert ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(loaded[1], vectors[3], atol=2e-3)  # id 2's later row
    # A shard written after the fold still wins over it (it sorts after the merged shard).
    versions.write_embedding_shard(store, "api-000000000001-v", np.array([1]), vectors[2:3])
    np.testing.assert_allclose(versions.load_embeddings(store, keep=[1])[1][0], vectors[2], atol=2e-3)


def test_linking_shards_while_a_fold_deletes_them_links_the_same_rows(tmp_path: Path, monkeypatch) -> None:
    """A publish links the store while the service's compaction folds it: the version gets every row."""
    store, target = tmp_path / "emb", tmp_path / "published"
    _many_small_shards(store, 5)
    before_ids, before = versions.load_embeddings(store)
    real_link, folded = versions.link_or_copy, []

    def fold_first(src: Path, dst: Path) -> None:  # the fold lands after the listing, before the first link
        if not folded:
            folded.append(versions.fold_shards(store, [s for s in versions.shard_stems(store)
                                                       if s.startswith("api-")], "api-000000000000-merged-1"))
        real_link(src, dst)

    monkeypatch.setattr(versions, "link_or_copy", fold_first)
    versions.link_shards(store, target)
    assert folded == [5]
    ids, loaded = versions.load_embeddings(target)
    assert np.array_equal(ids, before_ids) and np.array_equal(loaded, before)


def test_a_merged_shard_missing_its_vectors_does_not_replace_its_sources(tmp_path: Path) -> None:
    """After a power loss the merged shard's commit (ids) may exist without its vectors file: readers keep the
    sources, and the next fold must not delete them."""
    store = tmp_path / "emb"
    _many_small_shards(store, 3)
    sources = [s for s in versions.shard_stems(store) if s.startswith("api-")]
    before_ids, before = versions.load_embeddings(store)
    versions.fold_shards(store, sources, "api-000000000000-merged-1")
    # Recreate the sources (as if never deleted) and lose the merged shard's vectors file.
    _many_small_shards(store, 3)
    (store / f"api-000000000000-merged-1{versions.VEC_SUFFIX}").unlink()
    assert versions.remove_replaced(store) >= 0
    ids, loaded = versions.load_embeddings(store)
    assert np.array_equal(ids, before_ids) and np.array_equal(loaded, before)


def test_shard_lookup_opens_only_the_shards_it_needs(tmp_path: Path, monkeypatch) -> None:
    from index.shard_lookup import ShardLookup

    store = tmp_path / "emb"
    vectors = _many_small_shards(store, 40)
    lookup = ShardLookup(store)
    ids, found = lookup.read(np.array([7, 3, 999]))  # 999: stored nowhere
    assert ids.tolist() == [7, 3]
    np.testing.assert_allclose(found, vectors[[6, 2]], atol=2e-3)
    opened: list[str] = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **k: opened.append(Path(path).name) or real_load(path, *a, **k))
    lookup.read(np.array([5, 105]))
    assert sorted(opened) == ["api-000000000005-t.f16.npy", "run-1.f16.npy"]
    # A shard written since (an API add) is learnt by reading only its ids; a fold that deletes the shards the
    # lookup knew is noticed and the map rebuilt.
    versions.write_embedding_shard(store, "api-000000000041-t", np.array([41]), vectors[:1])
    opened.clear()
    assert lookup.read(np.array([41]))[0].tolist() == [41]
    assert sorted(opened) == ["api-000000000041-t.f16.npy", "api-000000000041-t.ids.npy"]
    monkeypatch.undo()
    versions.fold_shards(store, [s for s in versions.shard_stems(store) if s.startswith("api-")],
                         "api-000000000000-merged-1")
    ids, found = lookup.read(np.array([41, 7, 105]))
    assert ids.tolist() == [41, 7, 105]
    np.testing.assert_allclose(found[1], vectors[6], atol=2e-3)


def test_gpu_path_is_optional(data) -> None:
    ids, vectors = data
    index = built("HNSW16", ids[:50], vectors[:50])
    assert index.to_gpu() is False and not index.on_gpu  # HNSW has no GPU version, whatever the FAISS build
    flat = built("Flat", ids[:50], vectors[:50])
    assert flat.to_gpu() is gpu_available()
    _, found = flat.search(vectors[:3], 1)
    assert found[:, 0].tolist() == ids[:3].tolist()


@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a GPU (the `gpu` extra)")
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_the_real_gpu_copy_agrees_with_the_cpu_index(factory: str, data) -> None:
    """On a GPU machine with faiss-gpu, the real copy (float16 storage, so near-ties may swap: overlap, not equality),
    its nprobe and an add onto it."""
    ids, vectors = data
    on_gpu, on_cpu = built(factory, ids[:1500], vectors[:1500]), built(factory, ids[:1500], vectors[:1500])
    assert on_gpu.to_gpu() and on_gpu.placement() == "gpu"
    got, want = on_gpu.search(vectors[:50], 10)[1], on_cpu.search(vectors[:50], 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)]) >= 0.9
    on_gpu.add(ids[1500:1510], vectors[1500:1510])
    assert on_gpu._gpu_index is not None  # added onto, not dropped
    assert on_gpu.search(vectors[1500:1510], 1)[1][:, 0].tolist() == ids[1500:1510].tolist()
    on_gpu.remove(ids[1500:1505])  # kept on the copy, dropped from its results
    assert on_gpu._gpu_index is not None
    assert not np.isin(on_gpu.search(vectors[1500:1505], 5)[1], ids[1500:1505]).any()


class CopyOnCpu:
    """Stands in for faiss-gpu's copy of an index (which cannot run here): a CPU clone that counts its searches."""

    def __init__(self, index: faiss.Index) -> None:
        self.index, self.searches = faiss.clone_index(index), 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.searches += 1
        return self.index.search(queries, k)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_searches_on_the_gpu_copy_match_the_cpu_index_through_writes(factory: str, data, monkeypatch) -> None:
    """The GPU branch's own logic: excluded ids over-fetched and dropped, a query they leave short answered by
    the CPU index, a stale copy after a write, the copy made again later, a failed copy."""
    import index.vector_index as vector_index

    copies: list[CopyOnCpu] = []

    def copy_on_cpu(index: faiss.Index, resources: list) -> CopyOnCpu:
        copies.append(CopyOnCpu(index))
        return copies[-1]

    monkeypatch.setattr(vector_index, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(vector_index, "_copy_to_gpus", copy_on_cpu)
    monkeypatch.setattr(vector_index, "_set_gpu_nprobe",
                        lambda copy, nprobe: faiss.ParameterSpace().set_index_parameter(copy.index, "nprobe", nprobe))
    ids, vectors = data
    on_gpu, on_cpu = built(factory, ids[:500], vectors[:500]), built(factory, ids[:500], vectors[:500])
    assert on_gpu.to_gpu() and on_gpu.on_gpu and len(copies) == 1

    def same(queries: np.ndarray, k: int, *, gpu_searches: int, **kwargs) -> np.ndarray:
        before = sum(c.searches for c in copies)
        got, want = on_gpu.search(queries, k, **kwargs), on_cpu.search(queries, k, **kwargs)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        assert sum(c.searches for c in copies) - before == gpu_searches
        return got[1]

    found = same(vectors[:20], 10, gpu_searches=1)
    assert found[:, 0].tolist() == ids[:20].tolist()
    # Excluded ids never come back, and k results still do: the copy took no IDSelector.
    found = same(vectors[:20], 10, exclude_ids=ids[:40], gpu_searches=1)
    assert not np.isin(found, ids[:40]).any() and (found >= 0).all()
    if factory.startswith("IVF"):
        # Excluding all but 30 vectors empties the one probed list: the copy comes back short, and the CPU index
        # widens nprobe and finds 10 (the copy's short rows would fail both checks).
        for index in (on_gpu, on_cpu):
            index.params["nprobe"] = 1
        found = same(vectors[:3], 10, exclude_ids=ids[30:500], gpu_searches=1)
        assert (found >= 0).all()
        for index in (on_gpu, on_cpu):
            index.params["nprobe"] = 16
        # More lists to probe than faiss-gpu probes: the CPU index answers rather than lose recall to a cap.
        monkeypatch.setattr(vector_index, "GPU_MAX_K", 8)
        same(vectors[:5], 3, gpu_searches=0)
        monkeypatch.setattr(vector_index, "GPU_MAX_K", 2048)
    # Filtered and exact searches stay on the CPU index.
    same(vectors[:5], 3, allowed_ids=ids[100:200], gpu_searches=0)
    same(vectors[:5], 3, effort="exact", gpu_searches=0)
    assert len(copies) == 1

    # A new image goes onto the copy as well: found there at once, no new copy.
    for index in (on_gpu, on_cpu):
        index.add(ids[500:501], vectors[500:501])
    assert same(vectors[500:501], 1, gpu_searches=1)[0, 0] == ids[500]
    assert len(copies) == 1 and copies[-1].index.ntotal == 501
    # A removal stays on the copy (faiss-gpu cannot remove ids) and is dropped from its results: no new copy.
    for index in (on_gpu, on_cpu):
        index.remove(ids[500:501])
    assert ids[500] not in same(vectors[500:501], 5, gpu_searches=1)
    assert len(copies) == 1 and copies[-1].index.ntotal == 501
    # That id added back (its old vector is on the copy too), as a replaced vector would: the copy is stale, and
    # the CPU index answers until it is made again.
    for index in (on_gpu, on_cpu):
        index.add(ids[500:501], vectors[500:501])
    assert same(vectors[500:501], 1, gpu_searches=0)[0, 0] == ids[500]
    monkeypatch.setattr(vector_index, "GPU_RECOPY_INTERVAL_S", 0.0)
    assert same(vectors[500:501], 1, gpu_searches=1)[0, 0] == ids[500]
    assert len(copies) == 2 and copies[-1].index.ntotal == 501
    # Past GPU_REMOVED_MAX removals the copy is made again rather than over-fetched.
    monkeypatch.setattr(vector_index, "GPU_REMOVED_MAX", 0)
    for index in (on_gpu, on_cpu):
        index.remove(ids[500:501])
    assert ids[500] not in same(vectors[500:501], 5, gpu_searches=1)
    assert len(copies) == 3 and copies[-1].index.ntotal == 500
    monkeypatch.setattr(vector_index, "GPU_REMOVED_MAX", 256)
    # An add the copy refuses leaves it stale too, and the new image is found on the CPU index meanwhile.
    monkeypatch.setattr(vector_index, "GPU_RECOPY_INTERVAL_S", 3600.0)
    monkeypatch.setattr(CopyOnCpu, "add_with_ids", lambda self, v, i: (_ for _ in ()).throw(RuntimeError("full")))
    for index in (on_gpu, on_cpu):
        index.add(ids[501:502], vectors[501:502])
    assert same(vectors[501:502], 1, gpu_searches=0)[0, 0] == ids[501]
    monkeypatch.undo()  # every stand-in and interval back: set again below
    monkeypatch.setattr(vector_index, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(vector_index, "_copy_to_gpus", copy_on_cpu)
    monkeypatch.setattr(vector_index, "_set_gpu_nprobe",
                        lambda copy, nprobe: faiss.ParameterSpace().set_index_parameter(copy.index, "nprobe", nprobe))
    monkeypatch.setattr(vector_index, "GPU_RECOPY_INTERVAL_S", 0.0)
    for index in (on_gpu, on_cpu):
        index.remove(ids[501:502])

    assert on_gpu.placement() == "gpu"

    # A copy that fails (out of GPU memory) leaves the CPU index answering, says why, and is tried again.
    def out_of_memory(index: faiss.Index, resources: list) -> CopyOnCpu:
        raise RuntimeError("cudaMalloc error out of memory")

    monkeypatch.setattr(vector_index, "_copy_to_gpus", out_of_memory)
    assert ids[500] not in same(vectors[500:501], 5, gpu_searches=0)
    assert on_gpu.placement() == ("cpu (copying it to the GPU failed: RuntimeError: cudaMalloc error out of "
                                  "memory; tried again every 0 s)")
    monkeypatch.setattr(vector_index, "_copy_to_gpus", copy_on_cpu)
    same(vectors[:5], 3, gpu_searches=1)
    # The first, after the re-add, past the removal cap, after the refused add and the failure.
    assert on_gpu.placement() == "gpu" and len(copies) == 4
