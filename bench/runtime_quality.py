"""Retrieval quality through each inference runtime: cub100 test classes (50-99), leave-one-out R@K and MAP@R,
the images decoded and preprocessed exactly as the service does (app.images with JPEG draft to the model's
resize, the model's eval transform), embedded by torch fp32 (the reference), ONNX Runtime, OpenVINO fp32 and
OpenVINO at its default precision (bf16 on this CPU, which the parity check refuses; measured to show why).

    .venv/bin/python bench/runtime_quality.py [--embedder efficientnet_lite0] [--data-root ../shared/data/cub100]

Skips with a message when cub100 is absent. Prints a Markdown table (docs/quality.md, "Through the runtimes").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cub100"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default="efficientnet_lite0")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--classes", default="50:100")
    args = parser.parse_args()
    if not (args.data_root / "images.txt").is_file():
        print(f"skipped: cub100 is not at {args.data_root}")
        return 0

    import numpy as np
    import torch

    from app.images import read_image_file
    from models.checkpoint import save_checkpoint
    from models.data import cub_items, select_classes
    from models.embedder import eval_transform
    from models.evaluate import evaluate_embeddings
    from models.export import ensure_onnx, export_dir
    from models.runtime import OnnxRuntimeRunner, OpenVinoRunner, TorchRunner, cosine_per_image
    from models.zoo import create_embedder

    start, stop = (int(x) for x in args.classes.split(":"))
    items = select_classes(cub_items(args.data_root), start, stop)
    checkpoint = save_checkpoint(create_embedder(args.embedder), Path(tempfile.mkdtemp()) / args.embedder)
    embedder = create_embedder(checkpoint)
    config = embedder.config
    transform = eval_transform(config)
    pixels = torch.stack([transform(read_image_file(path, min_side=config.resize_size)) for path, _ in items])
    labels = np.array([label for _, label in items])
    onnx = ensure_onnx(embedder, export_dir(checkpoint))

    class Reference:  # torch fp32, eager, NCHW: what docs/quality.md's rows were measured with
        def run(self, batch: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return embedder(batch).numpy()

    runners = {"torch fp32 (reference)": Reference,
               "torch fp32 channels_last (the torch runtime)": lambda: TorchRunner(create_embedder(checkpoint),
                                                                                   torch.device("cpu")),
               "onnxruntime fp32": lambda: OnnxRuntimeRunner(onnx, config, torch.device("cpu"), 0),
               "openvino fp32": lambda: OpenVinoRunner(onnx, config, "fp32", 0),
               "openvino default precision": lambda: OpenVinoRunner(onnx, config, "reduced", 0)}
    reference = None
    print(f"{args.embedder}, cub100 classes {args.classes}, {len(items)} images\n")
    print("| runtime | precision | R@1 | R@2 | R@4 | R@8 | MAP@R | min cosine to torch fp32 | img/s (b=32) |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for label, make in runners.items():
        runner = make()
        began = time.perf_counter()
        vectors = np.concatenate([runner.run(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
        rate = len(pixels) / (time.perf_counter() - began)
        if reference is None:
            reference = vectors
        metrics = evaluate_embeddings(vectors, labels)
        precision = getattr(getattr(runner, "info", None), "precision", "fp32")
        print(f"| {label} | {precision} | " + " | ".join(f"{100 * metrics[f'recall@{k}']:.1f}" for k in (1, 2, 4, 8))
              + f" | {100 * metrics['map@r']:.1f} | {cosine_per_image(vectors, reference).min():.5f} | {rate:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
