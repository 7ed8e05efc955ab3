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
   the server's RSS (and its anonymous part: heap, not mapped files) and open file handles, vectors served; at
   the end the RSS slope (least squares over the rows after the first) in MB per 10 minutes. Flat RSS, handles
   and p99 over time = no leak.

Isolating what grows RSS: `--mix search` sends searches only; `--swap-every 0` never forces a rebuild;
`--compact-every 0` (with RETRIEVAL_COMPACT_AFTER_S=0 in the environment) never compacts. The server inherits
this process's environment, so `MALLOC_ARENA_MAX=2 .venv/bin/python bench/soak.py ...` runs it with 2 malloc
arenas. `--probe` loads bench/soak_probe/ into the server and adds glibc malloc's bytes in use, bytes held free
and arena count to each row (native heap vs allocator retention).
"""

from __future__ import annotations

import argparse
import json
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


def process_stats(pid: int) -> tuple[float, float, int]:
    """RSS MB, its anonymous part (heap and other private memory, not mapped files) MB, open file handles."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024,
            len(os.listdir(f"/proc/{pid}/fd")))


def probe_columns(path: Path, pid: int) -> str:
    """The newest bench/soak_probe sample of the server process, as table cells."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    mine = [sample for sample in lines if sample["pid"] == pid]
    if not mine:
        return " - | - | - |"
    last = mine[-1]
    return f" {last['in_use_mb']:>6.0f} | {last['free_mb']:>6.0f} | {last['arenas']:>3} |"


def slope_per_10_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per 10 minutes (0 with fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    t, mb = np.array(points).T
    return float(np.polyfit(t, mb, 1)[0] * 600)


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
                recorder: Recorder, stop: threading.Event, seed: int, writes: bool = True) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=60) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += rng.expovariate(rate)
            time.sleep(max(0.0, next_at - time.monotonic()))
            roll = rng.random()
            started = time.monotonic()
            if writes and roll < 0.10 and extras:
                path = extras[rng.randrange(len(extras))]
                response = client.post("/v1/images", files={"file": ("a.jpg", path.read_bytes())},
                                       data={"label": path.parent.name})
                if response.status_code == 201:
                    added.append(response.json()["id"])
                kind = "add"
            elif writes and roll < 0.15 and added:
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
    parser.add_argument("--compact-every", type=int, default=100, help="0: never (with RETRIEVAL_COMPACT_AFTER_S=0)")
    parser.add_argument("--mix", choices=("full", "search"), default="full",
                        help="full: 85%% searches, 10%% adds, 5%% deletes; search: searches only")
    parser.add_argument("--probe", action="store_true", help="malloc in use / free / arenas columns (see above)")
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
        probe_log = root / "probe.jsonl"
        if args.probe:
            env |= {"PYTHONPATH": str(REPO / "bench" / "soak_probe"), "SOAK_PROBE_LOG": str(probe_log),
                    "SOAK_PROBE_S": str(min(10.0, args.interval / 2))}
        server = LiveServer(env, root / "server.log").start()
        assert server.proc is not None
        try:
            queries = [p.read_bytes() for p in files[:64]]
            capacity = measure_capacity(server.base_url, queries, args.capacity_s)
            rate = args.load * capacity
            print(f"capacity {capacity:.1f} searches/s (8 closed-loop clients); soak at {rate:.1f} req/s "
                  f"({args.load:.0%}) for {args.seconds:.0f} s, {args.clients} clients, corpus {len(files)}, "
                  f"hot swap every {args.swap_every:.0f} s, compaction every {args.compact_every} changes, "
                  f"mix {args.mix}, MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
            probe_head = " malloc in use MB | malloc free MB | arenas |" if args.probe else ""
            print(f"| {'t (s)':>6} | {'requests':>8} | {'p50 ms':>7} | {'p99 ms':>7} | errors | {'RSS MB':>7} | "
                  f"anon MB |{probe_head} {'fds':>4} | {'vectors':>7} | index version |")
            print("|---:|---:|---:|---:|---|---:|---:|" + "---:|---:|---:|" * args.probe + "---:|---:|---|")
            recorder, stop, added = Recorder(), threading.Event(), []
            threads = [threading.Thread(target=client_loop, args=(server.base_url, rate / args.clients, queries,
                                                                  extras, added, recorder, stop, n,
                                                                  args.mix == "full"))
                       for n in range(args.clients)]
            for t in threads:
                t.start()
            started = last_swap = time.monotonic()
            total_errors = 0
            rss_points: list[tuple[float, float]] = []
            while time.monotonic() - started < args.seconds:
                time.sleep(min(args.interval, max(0.1, args.seconds - (time.monotonic() - started))))
                if args.swap_every > 0 and time.monotonic() - last_swap >= args.swap_every:
                    rebuild_index(settings, progress=False)  # a new version: the server hot-swaps to it
                    last_swap = time.monotonic()
                count, latencies, errors = recorder.take()
                total_errors += sum(errors.values())
                rss, anon, fds = process_stats(server.proc.pid)
                elapsed = time.monotonic() - started
                rss_points.append((elapsed, rss))
                probe = probe_columns(probe_log, server.proc.pid) if args.probe else ""
                ready = httpx.get(f"{server.base_url}/readyz", timeout=30).json()["detail"]
                p50, p99 = (np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0))
                print(f"| {elapsed:>6.0f} | {count:>8} | {p50:>7.0f} | {p99:>7.0f} | "
                      f"{errors or 0} | {rss:>7.0f} | {anon:>7.0f} |{probe} {fds:>4} | "
                      f"{ready.get('vectors', '-'):>7} | "
                      f"{ready.get('index_version', '-')} |", flush=True)
            stop.set()
            for t in threads:
                t.join()
            print(f"errors in total: {total_errors}; RSS slope after the first row: "
                  f"{slope_per_10_min(rss_points[1:]):+.1f} MB per 10 minutes")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
