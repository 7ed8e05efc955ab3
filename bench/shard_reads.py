"""Reading a few stored vectors from an embedding store full of one-row API shards: every shard vs an id -> shard
map (index/shard_lookup.py), and both after the fold that compaction does (index/versions.fold_shards).

    .venv/bin/python bench/shard_reads.py                  # 10,000 one-row shards next to a 100,000-row build shard
    .venv/bin/python bench/shard_reads.py --adds 1000

What /v1/images/{id}/similar, MMR and duplicates do on an IVF index (which keeps no vectors): read 5 ids' vectors.
Prints one table (milliseconds per read of 5 ids; the median of --repeats reads; files are in the page cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index import versions  # noqa: E402
from index.shard_lookup import ShardLookup  # noqa: E402


def median_ms(read, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adds", type=int, default=10_000, help="one-row API shards")
    parser.add_argument("--built", type=int, default=100_000, help="rows in the build's shard")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        versions.write_embedding_shard(store, "run-1", np.arange(1, args.built + 1),
                                       rng.standard_normal((args.built, args.dim)))
        start = time.perf_counter()
        for i in range(args.adds):
            image_id = args.built + 1 + i
            versions.write_embedding_shard(store, f"api-{image_id:012d}-t", np.array([image_id]),
                                           rng.standard_normal((1, args.dim)))
        write_s = time.perf_counter() - start
        wanted = np.array([3, 77, args.built + 5, args.built + args.adds // 2, args.built + args.adds])
        rows = []
        for when in ("before the fold", "after the fold"):
            lookup = ShardLookup(store)
            start = time.perf_counter()
            lookup.read(wanted)
            first_ms = (time.perf_counter() - start) * 1000
            files = len(list(store.iterdir()))
            rows.append((when, files, median_ms(lambda: versions.load_embeddings(store, keep=wanted), args.repeats),
                         first_ms, median_ms(lambda lk=lookup: lk.read(wanted), args.repeats)))
            if when == "before the fold":
                sources = [s for s in versions.shard_stems(store) if s.startswith("api-")]
                start = time.perf_counter()
                versions.fold_shards(store, sources, "api-000000000000-merged-1")
                fold_s = time.perf_counter() - start
    print(f"{args.adds} one-row shards written in {write_s:.1f} s; folded into one in {fold_s:.2f} s; "
          f"build shard {args.built} rows, dim {args.dim}")
    print("| store | files | every shard (load_embeddings) ms | map, first read (builds it) ms | map ms |")
    print("|---|---|---|---|---|")
    for when, files, every, first, mapped in rows:
        print(f"| {when} | {files} | {every:.1f} | {first:.1f} | {mapped:.2f} |")


if __name__ == "__main__":
    main()
