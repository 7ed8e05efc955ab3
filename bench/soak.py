"""Soak: a real `retrieval serve` driven at ~80% of its measured capacity for a long time, with a mix of searches,
adds and deletes, compactions (RETRIEVAL_COMPACT_EVERY) and a forced hot swap (`index rebuild`) now and then.

    .venv/bin/python bench/soak.py --seconds 1800            # the 30-minute run for the record
    .venv/bin/python bench/soak.py --seconds 180 --interval 30

1. Builds an index over `--corpus` images of cub100 (../shared; synthetic images when absent), default model.
2. Measures capacity: 8 closed-loop search clients for `--capacity-s` seconds -> q/s.
3. Runs `--clients` paced clients whose total rate is `--load` x capacity: 85% searches, 10% adds (cub100
   images not in the corpus), 5% deletes (of images this run added); every `--swap-every` seconds a forced
   `index rebuild` publishes a new version that the server hot-swaps to.
4. Prints one row per `--interval`: requests, errors (non-2xx other than the 409 of a re-add), p50/p99 latency,
   the server's RSS and open file handles, vectors served. Flat RSS, handles and p99 over time = no leak.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.live_server import LiveServer  # noqa: E402 - after the repo is on sys.path

CUB = REPO.parent / "shared" / "data" / "cub100" / "images"


def corpus_files(count: int, extra: int, root: Path) -> tuple[list[Path], list[Path]]:
    """`count` corpus images (in class folders) and `extra` others to add online."""
    if CUB.is_dir():
        files = sorted(CUB.rglob("*.jpg"))
        random.Random(0).shuffle(files)
        return files[:count], files[count:count + extra]
    from PIL import Image

    print("cub100 not found: synthetic images", file=sys.stderr)
    rng = np.random.default_rng(0)
    out = []
    for n in range(count + extra):
        path = root / "synthetic" / f"c{n % 10}" / f"{n}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out[:count], out[count:]


def link_corpus(files: list[Path], root: Path) -> Path:
    corpus = root / "corpus"
    for path in files:
        target = corpus / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(path)
    return corpus


def process_stats(pid: int) -> tuple[float, int]:
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def measure_capacity(base: str, queries: list[bytes], seconds: float, clients: int = 8) -> float:
    done = [0]
    stop = time.monotonic() + seconds

    def loop() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while time.monotonic() < stop:
                client.post("/v1/search", files={"file": ("q.jpg", random.choice(queries))}, data={"k": "10"})
                done[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.count = 0

    def record(self, kind: str, status: int, seconds: float) -> None:
        with self.lock:
            self.count += 1
            self.latencies.append(seconds * 1000)
            if status >= 400 and status != 409:
                self.errors[f"{kind} {status}"] = self.errors.get(f"{kind} {status}", 0) + 1

    def take(self) -> tuple[int, list[float], dict[str, int]]:
        with self.lock:
            out = self.count, self.latencies, self.errors
            self.count, self.latencies, self.errors = 0, [], {}
        return out


def client_loop(base: str, rate: float, queries: list[bytes], extras: list[Path], added: list[int],
                recorder: Recorder, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=60) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += rng.expovariate(rate)
            time.sleep(max(0.0, next_at - time.monotonic()))
            roll = rng.random()
            started = time.monotonic()
            if roll < 0.10 and extras:
                path = extras[rng.randrange(len(extras))]
                response = client.post("/v1/images", files={"file": ("a.jpg", path.read_bytes())},
                                       data={"label": path.parent.name})
                if response.status_code == 201:
                    added.append(response.json()["id"])
                kind = "add"
            elif roll < 0.15 and added:
                victim = added.pop(rng.randrange(len(added)))
                response = client.delete(f"/v1/images/{victim}")
                kind = "delete"
            else:
                response = client.post("/v1/search", files={"file": ("q.jpg", rng.choice(queries))},
                                       data={"k": "10"})
                kind = "search"
            recorder.record(kind, response.status_code, time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1800)
    parser.add_argument("--interval", type=float, default=60)
    parser.add_argument("--corpus", type=int, default=500)
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--capacity-s", type=float, default=20)
    parser.add_argument("--swap-every", type=float, default=300)
    parser.add_argument("--compact-every", type=int, default=100)
    args = parser.parse_args()

    from app.db import migrate
    from app.indexing import build_index, rebuild_index
    from app.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, extras = corpus_files(args.corpus, max(200, args.corpus // 2), root)
        settings = Settings(data_dir=root / "data", num_workers=1)
        settings.data_dir.mkdir()
        migrate.upgrade(settings.resolved_database_url)
        build_index(settings, link_corpus(files, root), progress=False)
        env = dict(os.environ) | {"RETRIEVAL_DATA_DIR": str(settings.data_dir), "RETRIEVAL_SWAP_POLL_S": "2",
                                  "RETRIEVAL_COMPACT_EVERY": str(args.compact_every)}
        server = LiveServer(env, root / "server.log").start()
        assert server.proc is not None
        try:
            queries = [p.read_bytes() for p in files[:64]]
            capacity = measure_capacity(server.base_url, queries, args.capacity_s)
            rate = args.load * capacity
            print(f"capacity {capacity:.1f} searches/s (8 closed-loop clients); soak at {rate:.1f} req/s "
                  f"({args.load:.0%}) for {args.seconds:.0f} s, {args.clients} clients, corpus {len(files)}, "
                  f"hot swap every {args.swap_every:.0f} s, compaction every {args.compact_every} changes")
            print(f"| {'t (s)':>6} | {'requests':>8} | {'p50 ms':>7} | {'p99 ms':>7} | errors | {'RSS MB':>7} | "
                  f"{'fds':>4} | {'vectors':>7} | index version |")
            print("|---:|---:|---:|---:|---|---:|---:|---:|---|")
            recorder, stop, added = Recorder(), threading.Event(), []
            threads = [threading.Thread(target=client_loop, args=(server.base_url, rate / args.clients, queries,
                                                                  extras, added, recorder, stop, n))
                       for n in range(args.clients)]
            for t in threads:
                t.start()
            started = last_swap = time.monotonic()
            total_errors = 0
            while time.monotonic() - started < args.seconds:
                time.sleep(min(args.interval, max(0.1, args.seconds - (time.monotonic() - started))))
                if time.monotonic() - last_swap >= args.swap_every:
                    rebuild_index(settings, progress=False)  # a new version: the server hot-swaps to it
                    last_swap = time.monotonic()
                count, latencies, errors = recorder.take()
                total_errors += sum(errors.values())
                rss, fds = process_stats(server.proc.pid)
                ready = httpx.get(f"{server.base_url}/readyz", timeout=30).json()["detail"]
                p50, p99 = (np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0))
                print(f"| {time.monotonic() - started:>6.0f} | {count:>8} | {p50:>7.0f} | {p99:>7.0f} | "
                      f"{errors or 0} | {rss:>7.0f} | {fds:>4} | {ready.get('vectors', '-'):>7} | "
                      f"{ready.get('index_version', '-')} |", flush=True)
            stop.set()
            for t in threads:
                t.join()
            print(f"errors in total: {total_errors}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
