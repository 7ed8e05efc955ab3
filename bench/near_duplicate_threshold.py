"""Precision and recall of near-duplicate thresholds on real photos: cub100 test classes (50-99), a few photos
per class, each with three made copies (JPEG re-encoded at quality 60; resized to 50%; 10% cropped away: 5% off
every side), against the hardest negatives there are: distinct photos of the same bird species.

Every image goes through the service's own path (app.images.decode_image with the JPEG draft the service uses,
the model's eval transform), embedded by the default embedder in torch fp32. A pair is called a near-duplicate
when its cosine is >= the threshold.

    .venv/bin/python bench/near_duplicate_threshold.py [--per-class 4] [--embedder efficientnet_lite0]

Prints a Markdown table (docs/api.md, "Near-duplicates"). Skips with a message when cub100 is absent.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cub100"
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)


def made_copies(data: bytes) -> dict[str, bytes]:
    """The three edits a catalogue sees most: a re-encode, a downscale, a light crop (all re-saved as JPEG)."""
    from PIL import Image

    from app.images import decode_image

    image = decode_image(data)

    def encode(img: Image.Image, quality: int = 90) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    w, h = image.size
    dx, dy = round(w * 0.05), round(h * 0.05)
    return {
        "jpeg q60": encode(image, quality=60),
        "resize 50%": encode(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)),
        "crop 10%": encode(image.crop((dx, dy, w - dx, h - dy))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default="efficientnet_lite0")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--classes", default="50:100")
    parser.add_argument("--per-class", type=int, default=4)
    args = parser.parse_args()
    if not (args.data_root / "images.txt").is_file():
        print(f"skipped: cub100 is not at {args.data_root}")
        return 0

    import numpy as np
    import torch

    from app.images import decode_image
    from models.checkpoint import save_checkpoint
    from models.data import cub_items, select_classes
    from models.embedder import eval_transform
    from models.zoo import create_embedder

    start, stop = (int(x) for x in args.classes.split(":"))
    items, seen = [], {}
    for path, label in select_classes(cub_items(args.data_root), start, stop):
        if seen.get(label, 0) < args.per_class:
            seen[label] = seen.get(label, 0) + 1
            items.append((path, label))
    checkpoint = save_checkpoint(create_embedder(args.embedder), Path(tempfile.mkdtemp()) / args.embedder)
    embedder = create_embedder(checkpoint).eval()
    transform = eval_transform(embedder.config)

    def embed(data: bytes) -> np.ndarray:
        image = decode_image(data, min_side=embedder.config.resize_size)
        with torch.inference_mode():
            return embedder(transform(image)[None]).numpy()[0]

    originals, copies = [], {name: [] for name in ("jpeg q60", "resize 50%", "crop 10%")}
    for path, _ in items:
        data = Path(path).read_bytes()
        originals.append(embed(data))
        for name, copy in made_copies(data).items():
            copies[name].append(embed(copy))
    originals_arr = np.stack(originals)
    labels = np.array([label for _, label in items])
    positive = {name: np.einsum("ij,ij->i", originals_arr, np.stack(vecs)) for name, vecs in copies.items()}
    all_positive = np.concatenate(list(positive.values()))
    negative = np.array([float(originals_arr[i] @ originals_arr[j])
                         for i, j in combinations(range(len(items)), 2) if labels[i] == labels[j]])

    print(f"{len(items)} photos of {len(seen)} species, {len(all_positive)} (photo, made copy) pairs, "
          f"{len(negative)} pairs of distinct photos of one species; embedder {args.embedder}\n")
    print("| threshold | precision | recall (all copies) | jpeg q60 | resize 50% | crop 10% | same-species pairs "
          "above |")
    print("|---|---|---|---|---|---|---|")
    for t in THRESHOLDS:
        tp, fp = int((all_positive >= t).sum()), int((negative >= t).sum())
        precision = tp / (tp + fp) if tp + fp else 1.0
        per_kind = " | ".join(f"{(positive[n] >= t).mean():.3f}" for n in copies)
        print(f"| {t:.2f} | {precision:.3f} | {tp / len(all_positive):.3f} | {per_kind} | {fp} |")
    print("\nlowest copy score per edit: " + ", ".join(f"{n} {v.min():.3f}" for n, v in positive.items())
          + f"; highest same-species score {negative.max():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
