"""Kill -9 cycles: a real `retrieval serve` SIGKILLed again and again while clients add and delete, then checked.

    .venv/bin/python bench/kill_cycles.py                  # 33 cycles, 4 clients (the docs/reliability.md row)
    .venv/bin/python bench/kill_cycles.py --cycles 3       # a quick look

1. Builds an index over `--corpus` cub100 images (../shared; synthetic images when absent), default model.
2. Each cycle: the server starts; `--clients` threads add images not in the corpus (each source image once, so
   each added image should be its own top-1) and delete images they added earlier; after a random 1 to 3 s the
   server is SIGKILLed mid-traffic. Only answers the server gave count: a 201 is an acknowledged add, a 204 an
   acknowledged delete; requests cut by the kill are unknown and not counted either way.
3. After the last cycle the server starts once more and every acknowledged add must be there (GET 200) and be
   its own top-1 by its bytes, every acknowledged delete must stay gone (404), no answer may have been a 5xx,
   and `retrieval index verify` must pass. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.soak import corpus_files, link_corpus  # noqa: E402 - after the repo is on sys.path
from tests.live_server import LiveServer  # noqa: E402


class Ledger:
    """What the server acknowledged, across cycles."""

    def __init__(self, extras: list[Path]) -> None:
        self.lock = threading.Lock()
        self.extras = list(extras)
        self.added: dict[int, Path] = {}  # acknowledged adds still expected to be live
        self.deleted: set[int] = set()
        self.acknowledged_adds = 0
        self.server_errors: list[str] = []

    def next_source(self) -> Path | None:
        with self.lock:
            return self.extras.pop() if self.extras else None

    def victim(self, rng: random.Random) -> int | None:
        with self.lock:
            return rng.choice(list(self.added)) if self.added else None


def client_loop(base: str, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=30) as client:
        while not stop.is_set():
            try:
                if rng.random() < 0.8:
                    source = ledger.next_source()
                    if source is None:
                        return
                    response = client.post("/v1/images", files={"file": ("a.jpg", source.read_bytes())},
                                           data={"label": source.parent.name})
                    if response.status_code == 201:
                        with ledger.lock:
                            ledger.added[response.json()["id"]] = source
                            ledger.acknowledged_adds += 1
                else:
                    victim = ledger.victim(rng)
                    if victim is None:
                        continue
                    response = client.delete(f"/v1/images/{victim}")
                    if response.status_code == 204:
                        with ledger.lock:
                            ledger.added.pop(victim, None)
                            ledger.deleted.add(victim)
                if response.status_code >= 500:
                    with ledger.lock:
                        ledger.server_errors.append(f"{response.request.method} {response.status_code}")
            except httpx.HTTPError:  # the kill cut this request: its outcome is unknown, and not counted
                time.sleep(0.05)


def check(base: str, ledger: Ledger) -> dict[str, int]:
    lost = not_top1 = resurrected = 0
    with httpx.Client(base_url=base, timeout=60) as client:
        for image_id, source in ledger.added.items():
            if client.get(f"/v1/images/{image_id}").status_code != 200:
                lost += 1
                continue
            hits = client.post("/v1/search", files={"file": ("q.jpg", source.read_bytes())},
                               data={"k": "1"}).json()["results"]
            not_top1 += not hits or hits[0]["id"] != image_id
        for image_id in ledger.deleted:
            resurrected += client.get(f"/v1/images/{image_id}").status_code != 404
    return {"lost": lost, "not_top1": not_top1, "resurrected": resurrected}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=33)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--corpus", type=int, default=200)
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the temporary data dir)")
    args = parser.parse_args()

    from app.db import migrate
    from app.indexing import build_index
    from app.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, extras = corpus_files(args.corpus, 200 * args.cycles, root)
        settings = Settings(data_dir=root / "data", num_workers=1, database_url=args.database_url)
        settings.data_dir.mkdir()
        migrate.upgrade(settings.resolved_database_url)
        build_index(settings, link_corpus(files, root), progress=False)
        env = dict(os.environ) | {"RETRIEVAL_DATA_DIR": str(settings.data_dir)}
        if args.database_url:
            env["RETRIEVAL_DATABASE_URL"] = args.database_url
        server = LiveServer(env, root / "server.log")
        ledger = Ledger(extras)
        rng = random.Random(0)
        started = time.monotonic()
        for cycle in range(args.cycles):
            server.start()
            stop = threading.Event()
            threads = [threading.Thread(target=client_loop, args=(server.base_url, ledger, stop, 1000 * cycle + n))
                       for n in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(1, 3))
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            stop.set()
            for t in threads:
                t.join()
            print(f"cycle {cycle + 1}/{args.cycles}: {ledger.acknowledged_adds} adds and {len(ledger.deleted)} "
                  f"deletes acknowledged so far", flush=True)
        server.start()
        try:
            result = check(server.base_url, ledger)
        finally:
            server.stop()
        verify = subprocess.run([sys.executable, "-m", "app.cli", "index", "verify"], cwd=REPO, env=env,
                                capture_output=True, text=True)
        print(f"\n{args.cycles} SIGKILL cycles, {args.clients} clients, {time.monotonic() - started:.0f} s, "
              f"corpus {len(files)}, database {'PostgreSQL' if args.database_url else 'SQLite'}\n")
        said = verify.stdout.strip().splitlines()  # its verdict (stderr carries the log)
        print("| adds acknowledged | lost | live adds not their own top-1 | deletes acknowledged | came back "
              "| 5xx answers | `index verify` |")
        print("|--:|--:|--:|--:|--:|--:|---|")
        print(f"| {ledger.acknowledged_adds} | {result['lost']} | {result['not_top1']} | {len(ledger.deleted)} | "
              f"{result['resurrected']} | {len(ledger.server_errors)} | exit {verify.returncode}: "
              f"{said[-1] if said else ''} |")
        bad = result["lost"] or result["not_top1"] or result["resurrected"] or ledger.server_errors or verify.returncode
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
