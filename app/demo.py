"""The demo corpus: real images available offline, exported to a folder the index build job reads.

Default: Debian's `dataset-fashion-mnist` package (MIT), N images per class from the training split as the
corpus and a few from the test split as held-out queries. Set RETRIEVAL_DEMO_SOURCE to use your own folder.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle_boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _export(images: np.ndarray, labels: np.ndarray, out: Path, per_class: int) -> int:
    if per_class < 1:  # [:0] would export nothing and [:-3] all but the last 3 of each class
        raise ValueError(f"per_class needs an integer >= 1; got {per_class}")
    written = 0
    for class_id, name in enumerate(FASHION_MNIST_CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, idx in enumerate(np.flatnonzero(labels == class_id)[:per_class]):
            path = folder / f"{n:05d}.png"
            if not path.exists():
                Image.fromarray(images[idx], mode="L").save(path)
                written += 1
        # An earlier run with a larger --per-class left more: the folder holds what this run asked for.
        for extra in folder.glob("[0-9][0-9][0-9][0-9][0-9].png"):
            if int(extra.stem) >= per_class:
                extra.unlink()
    return written


def export_fashion_mnist(data_dir: Path, per_class: int = 100, queries_per_class: int = 3,
                         source_dir: Path = FASHION_MNIST_DIR) -> tuple[Path, Path]:
    """Write <data_dir>/demo/corpus/<class>/*.png and <data_dir>/demo/queries/<class>/*.png; idempotent."""
    if not (source_dir / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {source_dir}: install Debian's dataset-fashion-mnist package "
            "or set RETRIEVAL_DEMO_SOURCE to a folder of your own images"
        )
    corpus, queries = data_dir / "demo" / "corpus", data_dir / "demo" / "queries"
    _export(_read_idx(source_dir / "train-images-idx3-ubyte.gz"),
            _read_idx(source_dir / "train-labels-idx1-ubyte.gz"), corpus, per_class)
    _export(_read_idx(source_dir / "t10k-images-idx3-ubyte.gz"),
            _read_idx(source_dir / "t10k-labels-idx1-ubyte.gz"), queries, queries_per_class)
    return corpus, queries
