"""Restart time against the number of online adds, before and after compaction.

`python bench/restart_bench.py [N ...]` (default 0 500 2000 8000). For each N: a fresh data dir (SQLite) holding
a published index of 200 images, then N online adds made the way POST /v1/images leaves them on disk (an SQL row
and one fsynced embedding shard each; the decode and forward pass are left out, they do not change what a
restart reads), then:

- restart before compaction: `load_active` (what the service's start does: load the model and the index,
  re-add every online change from the embedding store),
- `compact_index` (what the service runs after RETRIEVAL_COMPACT_EVERY changes),
- restart after compaction.

The model is a random-init resnet10t with a 1280-d head (EfficientNet-Lite0's width), so model loading is small
and constant and the table shows what grows with N.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.db import migrate  # noqa: E402
from app.db.models import Image  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.deployment import load_active, write_api_embedding  # noqa: E402
from app.indexing.compact import compact_index  # noqa: E402
from app.indexing.pipeline import rebuild_index  # noqa: E402
from app.registry import ensure_active_model  # noqa: E402
from app.settings import Settings  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.embedder import EmbedderConfig, TimmEmbedder  # noqa: E402

DIM = 1280
BASE = 200


def add_rows(settings: Settings, model_name: str, count: int, start: int, rng: np.random.Generator) -> None:
    store = settings.embeddings_dir(model_name)
    for n in range(start, start + count):
        vector = rng.standard_normal(DIM).astype(np.float32)
        vector /= np.linalg.norm(vector)
        with session_scope(settings.resolved_database_url) as session:
            row = Image(sha256=hashlib.sha256(f"img-{n}".encode()).hexdigest(), uri=f"/bench/{n}.jpg", width=64,
                        height=64, meta={})
            session.add(row)
            session.flush()
            write_api_embedding(store, row.id, vector)


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def run(count: int, root: Path, checkpoint: Path) -> tuple[int, float, float, float, int]:
    data = root / f"n{count}"
    settings = Settings(data_dir=data, embedder=str(checkpoint), runtime="torch", num_workers=0)
    data.mkdir(parents=True)
    migrate.upgrade(settings.resolved_database_url)
    model = ensure_active_model(settings)
    rng = np.random.default_rng(0)
    add_rows(settings, model.name, BASE, 0, rng)
    rebuild_index(settings, progress=False)  # the published version: BASE images
    add_rows(settings, model.name, count, BASE, rng)  # the online adds since
    before, deployment = timed(load_active, settings)
    restored = deployment.reconciled.get("restored", 0)
    compact_s, report = timed(compact_index, settings, "bench")
    after, _ = timed(load_active, settings)
    return count, before, compact_s, after, restored


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    counts = [int(x) for x in sys.argv[1:]] or [0, 500, 2000, 8000]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = root / "tiny-1280"
        save_checkpoint(TimmEmbedder(EmbedderConfig(arch="timm", backbone="resnet10t", dim=DIM, image_size=64,
                                                    resize_size=64, pretrained="none")), checkpoint)
        rows = [run(n, root, checkpoint) for n in counts]
    print(f"restart time (load_active) with N online adds over a published index of {BASE}, SQLite, {DIM}-d")
    print(f"{'online adds':>12} {'re-added at start':>18} {'restart before':>15} {'compaction':>11} "
          f"{'restart after':>14}")
    for count, before, compact_s, after, restored in rows:
        print(f"{count:>12} {restored:>18} {before:>14.2f}s {compact_s:>10.2f}s {after:>13.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
