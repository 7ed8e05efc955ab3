"""Datasets (a folder of class sub-folders, a CSV manifest, CUB-style lists), transforms and m-per-class sampling.

An item is `(image_path, label)`. Datasets decode lazily with the `load_image` function they are given (path ->
upright RGB PIL image): models/ has no decoder of its own, so that training and evaluation see exactly the pixels
the service sees (app passes app.images.file_loader(settings): EXIF orientation, transparency on white, 16-bit
greys scaled, size limits). Pass a picklable function (e.g. a functools.partial) when DataLoader workers are used.
Train transform: resize the shorter side to
config.resize_size (256), random crop config.image_size (224), horizontal flip; the eval transform is the
embedder's own (models.embedder.eval_transform).
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from models.embedder import EmbedderConfig, eval_transform

Item = tuple[str, int]
LoadImage = Callable[[str], Image.Image]  # path -> upright RGB image
# The files a folder is read for (training sets here, index builds in app/indexing): what app.images decodes.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif"}


class ItemsDataset(Dataset):
    """(path, label) items -> (transformed image tensor, label)."""

    def __init__(
        self, items: Sequence[Item], transform: Callable[[Image.Image], torch.Tensor], load_image: LoadImage
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.load_image = load_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        try:
            image = self.load_image(path)
        except Exception as exc:
            exc.add_note(f"while reading {path} (item {index})")  # the decoder's own message may not name the file
            raise
        return self.transform(image), label

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]


def folder_items(root: str | Path) -> tuple[list[Item], list[str]]:
    """`root/<class>/<image>` -> items and the class names (label i = class_names[i], sorted)."""
    root = Path(root)
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [
        (str(path), label)
        for label, name in enumerate(class_names)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return items, class_names


def csv_items(
    path: str | Path, root: str | Path | None = None, path_column: str = "path", label_column: str = "label"
) -> tuple[list[Item], list[str]]:
    """A CSV with a header; relative paths are taken from `root` (default: the CSV's folder)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    with path.open(newline="") as f:
        rows = [(row[path_column], row[label_column]) for row in csv.DictReader(f)]
    class_names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(class_names)}
    return [(str(base / p), index[label]) for p, label in rows], class_names


def cub_items(root: str | Path) -> list[Item]:
    """CUB-200-style `images.txt` + `image_class_labels.txt` (`<id>, <value>` or `<id> <value>` lines)."""
    root = Path(root)

    def read(name: str) -> dict[str, str]:
        lines = (root / name).read_text().splitlines()
        return dict(line.replace(",", " ").split(maxsplit=1) for line in lines if line.strip())

    paths, labels = read("images.txt"), read("image_class_labels.txt")
    return [(str(root / "images" / paths[i].strip()), int(labels[i])) for i in sorted(paths, key=int)]


def select_classes(items: Sequence[Item], start: int, stop: int) -> list[Item]:
    return [(p, y) for p, y in items if start <= y < stop]


def split_items(
    items: Sequence[Item], val_fraction: float, by: str = "images", seed: int = 0
) -> tuple[list[Item], list[Item]]:
    """Hold out a validation split: a fraction of each class's images ("images") or of the classes ("classes")."""
    rng = random.Random(seed)
    by_class: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    train: list[Item] = []
    val: list[Item] = []
    if by == "classes":
        classes = sorted(by_class)
        rng.shuffle(classes)
        held = set(classes[: max(1, round(len(classes) * val_fraction))]) if val_fraction > 0 else set()
        for label in sorted(by_class):
            (val if label in held else train).extend(by_class[label])
    elif by == "images":
        for label in sorted(by_class):
            group = list(by_class[label])
            rng.shuffle(group)
            n_val = int(round(len(group) * val_fraction))
            val.extend(group[:n_val])
            train.extend(group[n_val:])
    else:
        raise ValueError(f"split by 'images' or 'classes', not {by!r}")
    return train, val


def load_eval_items(kind: str, root: str, classes: str | None = None, csv_path: str | None = None) -> list[Item]:
    """Items of a dataset: kind "cub" (images.txt lists), "folder" or "csv"; classes "A:B" keeps labels in [A, B)."""
    if kind == "cub":
        items = cub_items(root)
    elif kind == "folder":
        items, _ = folder_items(root)
    elif kind == "csv":
        items, _ = csv_items(csv_path or root, root=None if csv_path is None else root)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}")
    if classes:
        start, stop = (int(v) for v in classes.split(":"))
        items = select_classes(items, start, stop)
    return items


def dataset_splits(data: dict[str, Any]) -> tuple[list[Item], list[Item], list[Item]]:
    """(train, val, test) items from a training config's `data:` section.

    data: root, kind ("cub", "folder" or "csv"), csv, train_classes [A, B], test_classes [C, D], val_fraction,
    val_split ("images" or "classes"), split_seed.
    """
    items = load_eval_items(data.get("kind", "cub"), data["root"], csv_path=data.get("csv"))
    train_range, test_range = data.get("train_classes"), data.get("test_classes")
    pool = select_classes(items, *train_range) if train_range else items
    test = select_classes(items, *test_range) if test_range else []
    train_part, val = split_items(
        pool, float(data.get("val_fraction", 0.15)), data.get("val_split", "images"), int(data.get("split_seed", 0))
    )
    return train_part, val, test


def train_transform(config: EmbedderConfig) -> Callable[[Image.Image], torch.Tensor]:
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(config.resize_size, antialias=True),
            T.RandomCrop(config.image_size),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )


def m_per_class_batches(labels: Sequence[int], m: int, batch_size: int, num_batches: int, seed: int) -> list[list[int]]:
    """`num_batches` batches of `batch_size` indices, `m` per class, drawn by PML's MPerClassSampler.

    The sampler draws from numpy's global RNG; it is seeded here so that an epoch's batches can be regenerated
    exactly on resume.
    """
    sampler = MPerClassSampler(
        list(labels), m=m, batch_size=batch_size, length_before_new_iter=num_batches * batch_size
    )
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        flat = list(iter(sampler))
    finally:
        np.random.set_state(state)
    return [flat[i : i + batch_size] for i in range(0, len(flat) - batch_size + 1, batch_size)]


__all__ = [
    "Item",
    "ItemsDataset",
    "LoadImage",
    "csv_items",
    "cub_items",
    "dataset_splits",
    "eval_transform",
    "folder_items",
    "load_eval_items",
    "m_per_class_batches",
    "select_classes",
    "split_items",
    "train_transform",
]
