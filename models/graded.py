"""Graded (continuous) labels: the log-ratio loss's batches, splits and ranking metrics.

An item is `(image_path, value)` with a number (e.g. a size or colour attribute, a taxonomy depth) instead of a
class id. What a user of such a model expects is that the ranking by embedding distance follows the ranking by
label distance, so the metrics are:
- `spearman`: per query, Spearman's rank correlation between the embedding distances and the label distances to
  every other item, averaged over queries (1: the orders agree; 0: unrelated);
- `ndcg@k`: per query, DCG of the k nearest neighbours by embedding with relevance exp(-|y_q - y_j| / s), s the
  median label distance of the set, over the DCG of the k nearest by label; averaged over queries.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data import LoadImage
from models.embedder import Embedder
from models.evaluate import embed_items

GradedItem = tuple[str, float]
NDCG_KS = (10,)


def is_graded(loss_section: dict | None) -> bool:
    from models.losses import GRADED_LOSSES

    return (loss_section or {}).get("name") in GRADED_LOSSES


def graded_batches(
    values: Sequence[float], batch_size: int, neighbors: int, num_batches: int, seed: int
) -> list[list[int]]:
    """Dense-triplet batches (Kim et al. 2019): a random anchor first, its `neighbors` nearest items by label, then
    items drawn at random from the rest; every batch a pure function of the seed (so resume regenerates it)."""
    rng = random.Random(seed)
    labels = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    n = len(labels)
    size = min(batch_size, n)
    k = max(0, min(neighbors, size - 1))
    batches = []
    for _ in range(num_batches):
        anchor = rng.randrange(n)
        dist = np.linalg.norm(labels - labels[anchor], axis=1)
        dist[anchor] = np.inf
        tie_break = np.array([rng.random() for _ in range(n)])  # equal labels: a different neighbour each time
        nearest = [int(i) for i in np.lexsort((tie_break, dist))[:k]]
        chosen = {anchor, *nearest}
        rest = [i for i in range(n) if i not in chosen]
        batches.append([anchor, *nearest, *rng.sample(rest, size - len(chosen))])
    return batches


def random_split(items: Sequence[GradedItem], val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Hold out a random fraction of the images (graded labels have no classes to split by)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_fraction))
    return order[n_val:], order[:n_val]


def csv_graded_items(
    path: str | Path, root: str | Path | None = None, path_column: str = "path", label_column: str = "value"
) -> list[GradedItem]:
    """A CSV with a header and a numeric label column; relative paths are taken from `root` (default: its folder)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    with path.open(newline="") as f:
        return [(str(base / row[path_column]), float(row[label_column])) for row in csv.DictReader(f)]


def graded_splits(data: dict[str, Any]) -> tuple[list[GradedItem], list[GradedItem], list[GradedItem]]:
    """(train, val, test) from a config's `data:` section with `graded: true`: a CSV (`csv`, `root`,
    `label_column`), random image splits of `test_fraction` then `val_fraction` (seeded by `split_seed`)."""
    items = csv_graded_items(data["csv"], data.get("root"), label_column=data.get("label_column", "value"))
    seed = int(data.get("split_seed", 0))
    pool, test = random_split(items, float(data.get("test_fraction", 0.0)), seed)
    train, val = random_split(pool, float(data.get("val_fraction", 0.15)), seed + 1)
    return train, val, test


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 along the last axis, ties sharing their mean rank (Spearman's convention)."""
    ranks = np.empty_like(values, dtype=np.float64)
    for row, out in zip(values, ranks, strict=True):
        order = np.argsort(row, kind="stable")
        plain = np.empty(len(row))
        plain[order] = np.arange(len(row))
        _, inverse = np.unique(row, return_inverse=True)
        out[:] = (np.bincount(inverse, plain) / np.bincount(inverse))[inverse]
    return ranks


def graded_metrics(
    embeddings: np.ndarray, values: np.ndarray | Sequence[float], ks: Sequence[int] = NDCG_KS
) -> dict[str, float]:
    """`spearman` and `ndcg@k` (module docstring) of L2-normalised embeddings, leave-one-out over the set."""
    emb = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(values, dtype=np.float64).reshape(len(emb), -1)
    n = len(emb)
    if n < 3:
        return {"spearman": 0.0, **{f"ndcg@{k}": 0.0 for k in ks}}
    emb_dist = np.maximum(2.0 - 2.0 * emb @ emb.T, 0.0)
    label_dist = np.linalg.norm(labels[:, None, :] - labels[None, :, :], axis=-1)
    others = ~np.eye(n, dtype=bool)
    emb_o = emb_dist[others].reshape(n, n - 1)
    lab_o = label_dist[others].reshape(n, n - 1)
    re, rl = _average_ranks(emb_o), _average_ranks(lab_o)
    re -= re.mean(axis=1, keepdims=True)
    rl -= rl.mean(axis=1, keepdims=True)
    denom = np.sqrt((re**2).sum(axis=1) * (rl**2).sum(axis=1))
    spearman = np.where(denom > 0, (re * rl).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    scale = float(np.median(lab_o)) or 1.0
    relevance = np.exp(-lab_o / scale)
    metrics = {"spearman": float(spearman.mean())}
    for k in ks:
        top = min(k, n - 1)
        discount = 1.0 / np.log2(np.arange(2, top + 2))
        by_embedding = np.take_along_axis(relevance, np.argsort(emb_o, axis=1, kind="stable")[:, :top], axis=1)
        ideal = -np.sort(-relevance, axis=1)[:, :top]
        metrics[f"ndcg@{k}"] = float(((by_embedding @ discount) / (ideal @ discount)).mean())
    return metrics


def evaluate_graded_items(
    embedder: Embedder,
    items: Sequence[GradedItem],
    load_image: LoadImage,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Embed the items with the eval transform and score the ranking against their graded labels."""
    emb, values = embed_items(embedder, items, load_image, batch_size, num_workers, device, amp)  # type: ignore[arg-type]
    return graded_metrics(emb, values)


__all__ = [
    "csv_graded_items",
    "graded_splits",
    "evaluate_graded_items","GradedItem", "graded_batches", "graded_metrics", "is_graded", "random_split"]
