"""JPEG decoding for index builds: the project's decoder (Pillow, DCT-scaled, in worker processes) against
torchvision.io.decode_jpeg in batches (nvJPEG on a GPU), images/s to the uint8 crop the forward pass takes.

The issue asks for batch-build decoding on the GPU "if it measures faster"; this is that measurement, so the
decision rests on a number. Both paths start from the file bytes in memory and end with the [3, S, S] uint8
crop of the model's transform (on the device for the GPU path). The pixel columns compare each path's crops
with the project decoder's: a GPU-decoded index would be built from slightly different pixels than its queries.

    python3 bench/decode_bench.py --device cuda          # on a GPU machine (bench/gpu_check.sh runs it)
    .venv/bin/python bench/decode_bench.py --device cpu  # here: torchvision's CPU decoder in nvJPEG's place

Two sets: cub100-sized photos (500x375) and 12-megapixel phone photos (service_bench's generator), made from
cub100 when ../shared is present, else from synthetic images (said in the output). Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.pool
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.images import decode_image  # noqa: E402
from app.indexing.embed import decode_workers  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.service_bench import CUB, photo_jpeg, synthetic_jpeg  # noqa: E402
from models.embedder import EmbedderConfig, EvalTransform  # noqa: E402

CONFIG = EmbedderConfig()  # resize 256, crop 224: every preset the project serves uses these
_TRANSFORM = EvalTransform(CONFIG)


def make_sets(photos: int, small: int) -> tuple[dict[str, list[bytes]], str]:
    sources = sorted(CUB.rglob("*.jpg"))[:: 37][: max(photos, small)] if CUB.is_dir() else []
    origin = f"cub100 ({CUB})" if sources else "synthetic images (../shared/data/cub100 is absent)"
    with tempfile.TemporaryDirectory() as tmp:
        if not sources:
            rng = np.random.default_rng(0)
            for i in range(max(photos, small)):
                path = Path(tmp) / f"{i}.jpg"
                path.write_bytes(synthetic_jpeg(rng, size=400))
                sources.append(path)
        with multiprocessing.Pool() as pool:
            small_set = pool.starmap(photo_jpeg, [(p, (500, 375), i) for i, p in enumerate(sources[:small])])
            photo_set = pool.starmap(photo_jpeg, [(p, (4000, 3000), i) for i, p in enumerate(sources[:photos])])
    return {"500x375": small_set, "12 MP": photo_set}, origin


def pillow_crop(data: bytes) -> torch.Tensor:
    """What a build's decode worker does per file (app.indexing.embed): the one decoder, then the crop."""
    return _TRANSFORM.crop(decode_image(data, min_side=CONFIG.resize_size))


def _pillow_crop_array(data: bytes) -> np.ndarray:
    # Plain arrays back through the pool's pipe: torch's tensor pickling would share memory by file descriptor.
    return pillow_crop(data).numpy()


def time_pillow(pool: multiprocessing.pool.Pool, images: list[bytes], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += sum(1 for _ in pool.imap_unordered(_pillow_crop_array, images, chunksize=4))
    return done / (time.perf_counter() - start)


def pillow_rows(sets: dict[str, list[bytes]], processes: int, seconds: float) -> dict[str, float]:
    """img/s per set with one pool of `processes` workers (started once: spawning imports torch in each)."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_pillow_crop_array, next(iter(sets.values()))[:processes])  # workers started and warm
        return {name: time_pillow(pool, images, seconds) for name, images in sets.items()}


def torchvision_crops(images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Batched decode on `device`, then the same resize (antialiased) and centre crop there, image by image."""
    decoded = decode_jpeg(images, device=device)
    return torch.stack([TF.center_crop(TF.resize(im, CONFIG.resize_size, antialias=True), CONFIG.image_size)
                        for im in decoded])


def time_torchvision(images: list[bytes], device: torch.device, batch: int, seconds: float) -> float:
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
    batches = [encoded[i:i + batch] for i in range(0, len(encoded), batch)]
    torchvision_crops(batches[0], device)  # nvJPEG's handle and buffers made once
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for chunk in batches:
            torchvision_crops(chunk, device)
            done += len(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def pixel_difference(images: list[bytes], device: torch.device) -> tuple[float, int]:
    """Mean and max absolute difference (0-255) of torchvision's crops from the project decoder's."""
    ours = torch.stack([pillow_crop(data) for data in images[:16]]).to(torch.int16)
    theirs = torchvision_crops([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images[:16]],
                               device).cpu().to(torch.int16)
    diff = (ours - theirs).abs()
    return float(diff.float().mean()), int(diff.max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=4.0, help="per row")
    parser.add_argument("--photos", type=int, default=24, help="12-MP photos to make (each ~2.6 MB)")
    parser.add_argument("--small", type=int, default=256, help="500x375 photos to make")
    parser.add_argument("--batch", type=int, default=64, help="images per decode_jpeg call")
    args = parser.parse_args()
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    # A GPU build's decode processes under the default RETRIEVAL_NUM_WORKERS (at least one per core but one).
    build_workers = decode_workers(Settings().num_workers, on_gpu=device.type == "cuda")
    sets, origin = make_sets(args.photos, args.small)
    print(f"# JPEG decode to the model's uint8 crop, {cores} cores, device {device}, images from {origin}\n")
    print("| images | path | img/s | x project decoder | mean abs pixel diff | max |")
    print("|---|---|--:|--:|--:|--:|")
    ours = pillow_rows(sets, build_workers, args.seconds)
    every = pillow_rows(sets, cores, args.seconds) if build_workers != cores else None
    for name, images in sets.items():
        # On CPU a build decodes in threads instead; this row is the GPU build's DataLoader workers.
        print(f"| {name} | Pillow (draft) + crop, {build_workers} processes (a GPU build's decode workers) | "
              f"{ours[name]:.0f} | 1.00 | 0 | 0 |", flush=True)
        if every is not None:
            print(f"| {name} | Pillow (draft) + crop, {cores} processes | {every[name]:.0f} | "
                  f"{every[name] / ours[name]:.2f} | 0 | 0 |", flush=True)
        theirs = time_torchvision(images, device, args.batch, args.seconds)
        mean, worst = pixel_difference(images, device)
        kind = "nvJPEG" if device.type == "cuda" else "libjpeg-turbo, one thread"
        print(f"| {name} | torchvision decode_jpeg on {device} ({kind}), batch {args.batch}, resize + crop there | "
              f"{theirs:.0f} | {theirs / ours[name]:.2f} | {mean:.2f} | {worst} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
