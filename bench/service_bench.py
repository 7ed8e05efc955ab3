"""Service benchmark: a real uvicorn server on loopback, N concurrent clients posting real JPEGs to /v1/search.

For each concurrency level (default 1, 8, 32, 64) it reports queries/s and p50 / p99 latency, with dynamic
micro-batching on and then off (max_batch_size=1), in the same run, on the same corpus and model. The mean
batch size comes from the server's own /metrics.

    .venv/bin/python bench/service_bench.py                       # efficientnet_lite0 on CPU
    .venv/bin/python bench/service_bench.py --device cuda --requests 400

Not a test: it prints a Markdown table (and --json writes the rows).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.live_server import LiveServer  # noqa: E402 - after the repo is on sys.path


def synthetic_jpeg(rng: np.random.Generator, size: int = 256) -> bytes:
    """A photo-sized JPEG with structure (colour blocks, stripes, noise), so decode and resize do real work."""
    base = rng.integers(0, 255, size=3).astype(np.float32)
    img = np.tile(base, (size, size, 1))
    period = int(rng.integers(6, 40))
    img[:, (np.arange(size) // period) % 2 == 1] *= 0.6
    img += rng.normal(0, 20, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_corpus(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = f"class{i % 10}"
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.jpg").write_bytes(synthetic_jpeg(rng))
    return root


def batch_stats(url: str) -> tuple[float, float]:
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("retrieval_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("retrieval_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


async def load(url: str, queries: list[bytes], clients: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    next_request = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_request, failures
            while next_request < requests:
                i = next_request
                next_request += 1
                start = time.perf_counter()
                response = await client.post("/v1/search", files={"file": ("q.jpg", queries[i % len(queries)],
                                                                           "image/jpeg")}, data={"k": "10"})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures += 1

        # Warm-up: one request per client, not measured.
        await asyncio.gather(*(client.post("/v1/search", files={"file": ("q.jpg", queries[0], "image/jpeg")})
                               for _ in range(min(clients, 8))))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"qps": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"), "errors": failures,
            "requests": len(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level (default: max(40, 4 x clients))")
    parser.add_argument("--corpus", type=int, default=500, help="images in the index")
    parser.add_argument("--embedder", default="efficientnet_lite0", help="preset name or checkpoint dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--data-dir", help="reuse a data dir (default: a temporary one)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    from app.db.migrate import upgrade
    from app.indexing import build_index
    from app.settings import Settings

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="service-bench-"))
    settings = Settings(data_dir=data_dir, embedder=args.embedder, device=args.device, num_workers=0)
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    corpus = data_dir / "corpus"
    if not corpus.exists():
        make_corpus(corpus, args.corpus)
    build_index(settings, corpus, progress=False)
    rng = np.random.default_rng(123)
    queries = [synthetic_jpeg(rng) for _ in range(64)]
    levels = [int(c) for c in args.clients.split(",")]
    base_env = dict(os.environ) | {"RETRIEVAL_DATA_DIR": str(data_dir), "RETRIEVAL_EMBEDDER": args.embedder,
                                   "RETRIEVAL_DEVICE": args.device, "RETRIEVAL_MAX_QUEUE": "1024"}
    modes = {
        "batching on": {"RETRIEVAL_MAX_BATCH_SIZE": str(args.max_batch_size),
                        "RETRIEVAL_MAX_BATCH_WAIT_MS": str(args.max_batch_wait_ms)},
        "batching off": {"RETRIEVAL_MAX_BATCH_SIZE": "1", "RETRIEVAL_MAX_BATCH_WAIT_MS": "0"},
    }
    rows = []
    for mode, env in modes.items():
        log = data_dir / f"server-{mode.replace(' ', '-')}.log"
        with LiveServer(base_env | env, log, ["--log-level", "warning"]).start(timeout=180) as server:
            for clients in levels:
                requests = args.requests or max(40, 4 * clients)
                before = batch_stats(server.base_url)
                result = asyncio.run(load(server.base_url, queries, clients, requests))
                after = batch_stats(server.base_url)
                passes = after[1] - before[1]
                result.update(mode=mode, clients=clients,
                              mean_batch=(after[0] - before[0]) / passes if passes else float("nan"))
                rows.append(result)
                print(f"{mode:>12} {clients:>3} clients: {result['qps']:7.1f} q/s  p50 {result['p50_ms']:7.1f} ms  "
                      f"p99 {result['p99_ms']:7.1f} ms  mean batch {result['mean_batch']:.1f}", flush=True)

    import torch

    device = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    print(f"\nmodel {args.embedder}, {args.corpus} images, device {device}, {os.cpu_count()} CPU cores, "
          f"batching on = max_batch_size {args.max_batch_size}, max_batch_wait_ms {args.max_batch_wait_ms}\n")
    print("| clients | batching | queries/s | p50 ms | p99 ms | mean batch | errors |")
    print("|--:|---|--:|--:|--:|--:|--:|")
    for clients in levels:
        for row in (r for r in rows if r["clients"] == clients):
            print(f"| {clients} | {row['mode'].split()[1]} | {row['qps']:.1f} | {row['p50_ms']:.1f} | "
                  f"{row['p99_ms']:.1f} | {row['mean_batch']:.1f} | {row['errors']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
