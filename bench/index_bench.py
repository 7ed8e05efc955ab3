"""Index benchmark: build time, memory, recall@10 vs exact search, queries/s at batch 1 and 64, per index type.

Not a test. Data: low-rank synthetic vectors of dimension 384 that look like embeddings (clustered, a few dozen
effective dimensions, L2-normalised); no million real embeddings can be had offline here. Each type's search
parameter (nprobe / efSearch) is tuned on held-out sample queries to reach recall@10 >= 0.95, as a build does,
then measured on other queries. Run:

    .venv/bin/python bench/index_bench.py --sizes 100000 1000000 [--types Flat HNSW32 ...] [--gpu-torch]
        [--efforts fast balanced exact]

`--efforts` measures each type at each per-request effort (index/search_params.py: fast, balanced = the tuned
value, exact) from the same built and tuned index; the default measures balanced only.

`--gpu-torch` adds exact kNN with torch on the GPU (where faiss-gpu is not installed, e.g. the lent machine).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index.builders import tune  # noqa: E402
from index.vector_index import VectorIndex, exact_knn  # noqa: E402


def synthetic(n: int, dim: int, seed: int, rank: int = 64, clusters: int = 300) -> np.ndarray:
    """Clustered low-rank vectors + small isotropic noise, normalised: a stand-in for image embeddings."""
    rng = np.random.default_rng(1234)  # the same basis and centres for database and queries
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / math.sqrt(rank)
    centres = rng.standard_normal((clusters, rank)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        latent = centres[rng.integers(0, clusters, m)] + 1.0 * rng.standard_normal((m, rank)).astype(np.float32)
        block = latent @ basis + 0.15 * rng.standard_normal((m, dim)).astype(np.float32)
        faiss.normalize_L2(block)
        out[start : start + m] = block
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def default_types(n: int, dim: int) -> list[str]:
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return ["Flat", "HNSW32", f"IVF{nlist},Flat", f"OPQ48,IVF{nlist},PQ48"]


QPS_SECONDS = 3.0


def qps(index: VectorIndex, queries: np.ndarray, batch: int, effort: str = "balanced") -> float:
    budget_s = QPS_SECONDS
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s and done < len(queries):
        index.search(queries[done : done + batch], 10, effort=effort)
        done += batch
    return done / (time.perf_counter() - start)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def bench_size(n: int, dim: int, types: list[str], train_size: int, gpu_torch: bool,
               efforts: tuple[str, ...] = ("balanced",)) -> list[dict]:
    database = synthetic(n, dim, seed=1)
    ids = np.arange(n, dtype=np.int64) + 1
    tune_q, test_q = synthetic(300, dim, seed=2), synthetic(1000, dim, seed=3)
    _, tune_truth = exact_knn(tune_q, database, ids, 10)
    _, test_truth = exact_knn(test_q, database, ids, 10)
    rng = np.random.default_rng(0)
    train = database[rng.choice(n, size=min(n, train_size), replace=False)]
    rows = []
    for factory in types:
        gc.collect()
        before, start = rss_bytes(), time.perf_counter()
        index = VectorIndex(dim, factory)
        index.train(train)
        for s in range(0, n, 100_000):
            index.add(ids[s : s + 100_000], database[s : s + 100_000])
        build_s = time.perf_counter() - start
        mem = rss_bytes() - before
        with tempfile.TemporaryDirectory() as tmp:
            faiss.write_index(index.index, f"{tmp}/i")
            size = os.path.getsize(f"{tmp}/i")
        tune(index, tune_q, tune_truth, 10, 0.95)
        knob = {k: index.params[k] for k in ("nprobe", "efSearch") if k in index.params}
        for effort in efforts:
            _, found = index.search(test_q, 10, effort=effort)
            label = factory if efforts == ("balanced",) else f"{factory} [{effort}]"
            rows.append({"n": n, "type": label, "build_s": build_s, "rss_mb": mem / 2**20,
                         "file_mb": size / 2**20, "recall": recall_at(found, test_truth),
                         "qps1": qps(index, test_q, 1, effort), "qps64": qps(index, test_q, 64, effort),
                         "params": knob})
            print(fmt(rows[-1]), flush=True)
        del index
    if gpu_torch:
        rows.append(torch_exact(database, ids, test_q, test_truth))
        print(fmt(rows[-1]), flush=True)
    return rows


def torch_exact(database: np.ndarray, ids: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    """Exact kNN on the GPU with torch (fp16 matmul + topk): what faiss-gpu Flat would do."""
    import torch

    dev = torch.device("cuda")
    start = time.perf_counter()
    db = torch.from_numpy(database).to(dev, torch.float16)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start

    def search(q: np.ndarray) -> np.ndarray:
        scores = torch.from_numpy(q).to(dev, torch.float16) @ db.T
        return torch.topk(scores, 10, dim=1).indices.cpu().numpy()

    found = ids[search(queries)]
    out = {"n": len(database), "type": "torch exact fp16 (GPU)", "build_s": build_s,
           "rss_mb": torch.cuda.memory_allocated() / 2**20, "file_mb": 0.0, "recall": recall_at(found, truth),
           "params": {}}
    for batch in (1, 64):
        search(queries[:batch])
        torch.cuda.synchronize()
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < QPS_SECONDS and done < len(queries):
            search(queries[done : done + batch])
            done += batch
        out[f"qps{batch}"] = done / (time.perf_counter() - t0)
    return out


HEADER = (f"| {'n':>9} | {'type':<34} | {'build s':>8} | {'RAM MB':>7} | {'file MB':>7} | {'recall@10':>9} "
          f"| {'q/s b=1':>8} | {'q/s b=64':>9} | params |")


def fmt(r: dict) -> str:
    return (f"| {r['n']:>9} | {r['type']:<34} | {r['build_s']:>8.1f} | {r['rss_mb']:>7.0f} | {r['file_mb']:>7.0f} "
            f"| {r['recall']:>9.3f} | {r['qps1']:>8.0f} | {r['qps64']:>9.0f} | {r['params']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--types", nargs="*", default=None)
    parser.add_argument("--train-size", type=int, default=160_000)
    parser.add_argument("--gpu-torch", action="store_true")
    parser.add_argument("--efforts", nargs="+", default=["balanced"], choices=["fast", "balanced", "exact"])
    parser.add_argument("--qps-seconds", type=float, default=3.0, help="time spent measuring each q/s figure")
    args = parser.parse_args()
    global QPS_SECONDS
    QPS_SECONDS = args.qps_seconds
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; synthetic low-rank data, d={args.dim}")
    print(HEADER)
    print("|" + "---|" * 9)
    for n in args.sizes:
        bench_size(n, args.dim, args.types or default_types(n, args.dim), args.train_size, args.gpu_torch,
                   tuple(args.efforts))


if __name__ == "__main__":
    main()
