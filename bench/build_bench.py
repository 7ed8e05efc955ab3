"""Build benchmark: images/s of the batch index build in one process and on Ray (1 and 2 embed actors), on the same
folder in one run, with the model-only bound (the runner's forward pass on preprocessed tensors) beside them.

Not a test. Each build starts from an empty data dir and SQLite database, so all of them register, decode, embed
and publish the same images. The Ray builds run on one local Ray cluster started here (Ray's own start-up is not
counted: it is paid once per cluster, not per build). Run:

    .venv/bin/python bench/build_bench.py [--source DIR] [--limit 256] [--embedder efficientnet_lite0] \
        [--repeat 1] [--no-ray]

--repeat N measures the model-only bound and the one-process build N times, alternating, so the ratio holds on a
noisy machine.

Default source: the first --limit images of ../shared/data/cub100/images (skipped with a message when absent).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]
CUB = REPO.parent / "shared" / "data" / "cub100" / "images"


def manifest(source: Path, limit: int, directory: Path) -> Path:
    """A CSV manifest of the first `limit` images of `source` (sorted), so every build reads the same files."""
    from app.indexing import iter_source

    path = directory / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for n, entry in enumerate(iter_source(source)):
            if n == limit:
                break
            writer.writerow([str(entry.path), entry.label or ""])
    return path


def one_build(source: Path, workdir: Path, embedder: str, ray_address: str | None, actors: int = 0) -> dict:
    from app.db.migrate import upgrade
    from app.indexing import build_index
    from app.settings import Settings

    workdir.mkdir(parents=True)
    url = f"sqlite:///{workdir / 'retrieval.db'}"
    upgrade(url)
    settings = Settings(data_dir=workdir, database_url=url, embedder=embedder, ray_embed_actors=actors)
    start = time.perf_counter()
    report = build_index(settings, source, factory="Flat", progress=False, ray_address=ray_address)
    wall = time.perf_counter() - start
    return {"images": report.embedded, "embed_ips": report.images_per_second, "wall_ips": report.embedded / wall,
            "wall_s": wall}


def model_only(embedder: str, workdir: Path, batch_size: int, seconds: float = 10.0) -> float:
    """The runner's forward pass alone on preprocessed random tensors at the build's batch size."""
    import torch

    from app.db.migrate import upgrade
    from app.inference import load_runner
    from app.registry import ensure_active_model
    from app.settings import Settings

    workdir.mkdir(parents=True)
    url = f"sqlite:///{workdir / 'retrieval.db'}"
    upgrade(url)
    settings = Settings(data_dir=workdir, database_url=url, embedder=embedder)
    runner = load_runner(settings, ensure_active_model(settings).path)
    size = runner.config.image_size
    pixels = torch.randn(batch_size, 3, size, size)
    runner.run(pixels)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.run(pixels)
        done += batch_size
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=CUB)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--embedder", default="efficientnet_lite0")
    parser.add_argument("--repeat", type=int, default=1, help="model-only and one-process rows, alternating")
    parser.add_argument("--no-ray", action="store_true", help="only the model-only bound and the one-process build")
    args = parser.parse_args()
    if not args.source.exists():
        print(f"skipped: {args.source} is not here (../shared holds cub100 on the team's machines)")
        return 0
    from app.indexing.embed import decode_workers
    from app.settings import Settings
    from models.embedder import resolve_device
    from models.runtime import default_threads

    settings = Settings()
    batch_size, cpus = settings.batch_size, default_threads()
    on_gpu = resolve_device(settings.device).type == "cuda"
    workers = decode_workers(settings.num_workers, on_gpu)
    decode = (f"{workers} DataLoader decode processes" if on_gpu
              else f"{workers} decode threads, then the forward pass")
    with tempfile.TemporaryDirectory(prefix="buildbench") as tmp:
        tmp_path = Path(tmp)
        source = manifest(args.source, args.limit, tmp_path)
        rows = []
        for n in range(args.repeat):
            rows.append((f"model only (forward pass, b={batch_size})",
                         {"embed_ips": model_only(args.embedder, tmp_path / f"model{n}", batch_size)}))
            rows.append((f"single process ({decode})", one_build(source, tmp_path / f"single{n}", args.embedder, None)))
        if not args.no_ray:
            import ray

            # Logical CPUs: each embed actor holds one and decoding needs one, so 2 actors need 3 even on 2 cores.
            ray.init(num_cpus=max(3, cpus), include_dashboard=False, log_to_driver=False,
                     _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
            try:
                for actors in (1, 2):
                    rows.append((f"Ray, {actors} embed actor{'s' if actors > 1 else ''}",
                                 one_build(source, tmp_path / f"ray{actors}", args.embedder, "", actors)))
            finally:
                ray.shutdown()
    base = rows[0][1]["embed_ips"]  # each one-process row is read against the model-only row just before it
    print(f"\n{args.limit} images of {args.source}, embedder {args.embedder}, {cpus} CPUs\n")
    print("| run | embed img/s | end-to-end img/s | x model-only |")
    print("|---|---|---|---|")
    for name, row in rows:
        if name.startswith("model only"):
            base = row["embed_ips"]
        wall = f"{row['wall_ips']:.1f}" if "wall_ips" in row else "-"
        print(f"| {name} | {row['embed_ips']:.1f} | {wall} | {row['embed_ips'] / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
