"""Graded labels on cub100: the log-ratio loss against the contrastive recipe (docs/quality.md).

The graded label is a colour attribute every image has: its mean luminance (Rec. 601 luma of the decoded RGB,
0..1). Train on images of classes 0-49, score on images of the unseen classes 50-99 by how well embedding
distances rank images by luminance distance: Spearman (per query, over all others) and nDCG@10 (models/graded.py).
Both recipes start from the same off-the-shelf Lite0 with the same steps, batch, learning rates and input size:
- log_ratio: the log-ratio loss on the luminance itself, dense label-neighbourhood batches;
- contrastive: PML's contrastive loss (cosine; the IRT recipe without KoLeo or the memory) on `--bins` luminance
  quantile bins used as classes, m-per-class batches: what a class-label recipe can do with a graded label.

    python bench/graded_cub100.py --steps 30 --image-size 128 --train-images 1500 --test-images 500
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.images import read_image_file  # noqa: E402
from models.config import TrainConfig  # noqa: E402
from models.data import cub_items, select_classes  # noqa: E402
from models.graded import evaluate_graded_items  # noqa: E402
from models.train import train  # noqa: E402
from models.zoo import create_embedder  # noqa: E402

CUB = Path("/work/shared/data/cub100")


def luminance(path: str) -> float:
    image = np.asarray(read_image_file(path).convert("RGB").resize((64, 64)), dtype=np.float32) / 255
    return float((image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())


def sample(items: list, count: int, seed: int) -> list:
    return random.Random(seed).sample(items, min(count, len(items)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--out", default="runs/graded_cub100")
    parser.add_argument("--recipes", nargs="+", default=["log_ratio", "contrastive"])
    args = parser.parse_args()
    if not CUB.is_dir():
        print(f"{CUB} not found: nothing to measure")
        return
    started = time.perf_counter()
    items = cub_items(CUB)
    train_paths = [p for p, _ in sample(select_classes(items, 0, 50), args.train_images, 0)]
    test_paths = [p for p, _ in sample(select_classes(items, 50, 100), args.test_images, 1)]
    train_graded = [(p, luminance(p)) for p in train_paths]
    test_graded = [(p, luminance(p)) for p in test_paths]
    edges = np.quantile([v for _, v in train_graded], np.linspace(0, 1, args.bins + 1)[1:-1])
    train_binned = [(p, int(np.searchsorted(edges, v))) for p, v in train_graded]
    print(f"luminance: train {len(train_graded)} images (classes 0-49), test {len(test_graded)} (classes 50-99); "
          f"labelled in {time.perf_counter() - started:.0f} s")

    size = {"image_size": args.image_size, "resize_size": round(args.image_size * 256 / 224)}
    results = {}
    baseline = create_embedder("efficientnet_lite0")
    from models.embedder import EmbedderConfig, eval_transform

    config = EmbedderConfig.from_dict({**baseline.config.to_dict(), **size})
    baseline.config, baseline._transform = config, eval_transform(config)
    results["off-the-shelf Lite0"] = evaluate_graded_items(baseline, test_graded, read_image_file, num_workers=1)
    print("off-the-shelf", results["off-the-shelf Lite0"], flush=True)
    common = dict(embedder={"preset": "efficientnet_lite0", **size}, steps=args.steps, batch_size=args.batch_size,
                  lr=1e-4, head_lr=1e-3, warmup_steps=3, num_workers=1, eval_at_start=False,
                  eval_every=10**6, checkpoint_every=10**6, log_every=5, amp=False)
    for recipe in args.recipes:
        if recipe == "log_ratio":
            config_t = TrainConfig.from_dict({**common, "loss": {"name": "log_ratio", "neighbors": 5}})
            train_items = train_graded
        else:
            config_t = TrainConfig.from_dict({**common, "m_per_class": 4,
                                              "loss": {"name": "contrastive", "reduction": "sum_per_anchor"}})
            train_items = train_binned
        t = time.perf_counter()
        result = train(config_t, train_items, [], Path(args.out) / recipe, read_image_file, device="cpu")
        from models.checkpoint import load_checkpoint

        model = load_checkpoint(result.best_checkpoint_dir)
        results[recipe] = evaluate_graded_items(model, test_graded, read_image_file, num_workers=1)
        results[recipe]["train_s"] = round(time.perf_counter() - t)
        print(recipe, results[recipe], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\n{args.steps} steps x {args.batch_size} images at {args.image_size} px on CPU; "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| model | Spearman | nDCG@10 |")
    print("|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['spearman']:.3f} | {m['ndcg@10']:.3f} |")


if __name__ == "__main__":
    main()
