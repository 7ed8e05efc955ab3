"""Sequential query latency against a running server: `python bench/query_latency.py [URL] [QUERY_DIR] [N]`.

Sends N queries one at a time (each a held-out image, cycling) and prints a table of client-side latency and
the server's own per-stage timings. Defaults: the demo server and its held-out queries.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import httpx


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    query_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "data/demo/queries")
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    files = sorted(p for p in query_dir.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        print(f"no query images under {query_dir}; run `make demo` first", file=sys.stderr)
        return 2
    client = httpx.Client(base_url=url, timeout=60)
    # Warm-up: the first forward pass pays for lazy initialisation.
    client.post("/v1/search", files={"file": files[0].open("rb")}, data={"k": "10"}).raise_for_status()
    wall, stages, correct = [], {}, 0
    for i in range(n):
        path = files[i % len(files)]
        started = time.perf_counter()
        response = client.post("/v1/search", files={"file": (path.name, path.read_bytes())}, data={"k": "10"})
        wall.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        body = response.json()
        correct += bool(body["results"]) and body["results"][0]["label"] == path.parent.name
        for stage, ms in body["timings"].items():
            stages.setdefault(stage, []).append(ms)
    print(f"{n} sequential queries to {url}, k=10 (median / p90 in ms)")
    print(f"{'stage':<14}{'median':>10}{'p90':>10}")
    rows = [("client total", wall)] + sorted(stages.items())
    for name, values in rows:
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{name:<14}{statistics.median(values):>10.1f}{p90:>10.1f}")
    print(f"rank-1 label matches the query's folder: {correct}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
