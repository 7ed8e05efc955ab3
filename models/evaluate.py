"""Retrieval evaluation: Recall@K (for a list of K), MAP@R and R-precision.

Protocols: leave-one-out (CUB, Cars, SOP: every image queries all the others) and query/gallery (In-Shop).
Neighbours come from faiss (exact inner product on L2-normalised embeddings = cosine), on the GPU when faiss has
GPU support and CUDA is present, queried in chunks so 100k+ images fit in GPU memory; without faiss, an exact
chunked torch kNN (on the GPU when present). MAP@R and R-precision come from pytorch-metric-learning's
AccuracyCalculator; Recall@K for K > 1 is computed here.

Public API:
    evaluate_embeddings(embeddings, labels, ks=(1, 2, 4, 8), gallery_embeddings=None, gallery_labels=None) -> dict
        keys "recall@K" for each K, "map@r", "r_precision" (fractions in [0, 1]).
    embed_items(embedder, items, batch_size=64, num_workers=2, device=None) -> (embeddings, labels)
        with_mirror=True: (embeddings, mirror images' embeddings, labels), one decode per image
    evaluate_items(embedder, items, ks, gallery_items=None, ...) -> dict
    cli(argv) -> int     (`retrieval eval ...`; --config FILE --split val evaluates a training config's split)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.data import Item, ItemsDataset, csv_items, cub_items, folder_items, select_classes
from models.embedder import Embedder, average_with_mirror

try:  # faiss is a dependency, but the lent GPU machine may lack it: fall back to torch there.
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

DEFAULT_KS = (1, 2, 4, 8)


def _faiss_gpu_available() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def knn(
    queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False, chunk_size: int = 8192
) -> np.ndarray:
    """Indices [Nq, k] of each query's k most similar gallery rows (inner product), nearest first.

    exclude_self: queries and gallery are the same set and a query must not retrieve itself.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    k_search = min(k + int(exclude_self), len(gallery))
    if faiss is not None:
        index = faiss.IndexFlatIP(gallery.shape[1])
        if _faiss_gpu_available():
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(gallery)
        found = np.concatenate(
            [index.search(queries[i : i + chunk_size], k_search)[1] for i in range(0, len(queries), chunk_size)]
        )
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        g = torch.from_numpy(gallery).to(device)
        parts = []
        for i in range(0, len(queries), chunk_size):
            q = torch.from_numpy(queries[i : i + chunk_size]).to(device)
            parts.append((q @ g.t()).topk(k_search, dim=1).indices.cpu())
        found = torch.cat(parts).numpy()
    if not exclude_self:
        return found[:, :k]
    # Drop the query itself wherever it appears (ties can put a duplicate ahead of it), keep k.
    own = np.arange(len(queries))[:, None]
    keep = found != own
    out = np.empty((len(queries), min(k, k_search - 1)), dtype=np.int64)
    for row in range(len(queries)):
        out[row] = found[row][keep[row]][: out.shape[1]]
    return out


def recall_at_k(neighbor_labels: np.ndarray, query_labels: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Fraction of queries with at least one correct label among their first K neighbours."""
    hits = neighbor_labels == query_labels[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def _map_at_r(
    queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, same_set: bool
) -> dict[str, float]:
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calculator = AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision"),
        knn_func=CustomKNN(CosineSimilarity(), batch_size=4096),
        device=device,
    )
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    result = calculator.get_accuracy(
        t(queries), t(query_labels), t(gallery), t(gallery_labels), ref_includes_query=same_set
    )
    return {"map@r": float(result["mean_average_precision_at_r"]), "r_precision": float(result["r_precision"])}


def evaluate_embeddings(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence[int] | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    gallery_embeddings: np.ndarray | torch.Tensor | None = None,
    gallery_labels: np.ndarray | Sequence[int] | torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-precision of L2-normalised embeddings.

    Without a gallery: leave-one-out over `embeddings` (CUB, Cars, SOP). With one: `embeddings` are the queries
    and neighbours come from the gallery only (In-Shop).
    """
    as_np = lambda a: a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)  # noqa: E731
    queries, query_labels = as_np(embeddings).astype(np.float32), as_np(labels).astype(np.int64)
    same_set = gallery_embeddings is None
    if same_set:
        gallery, g_labels = queries, query_labels
    else:
        gallery, g_labels = as_np(gallery_embeddings).astype(np.float32), as_np(gallery_labels).astype(np.int64)
    neighbors = knn(queries, gallery, max(ks), exclude_self=same_set)
    metrics = recall_at_k(g_labels[neighbors], query_labels, ks)
    metrics.update(_map_at_r(queries, query_labels, gallery, g_labels, same_set))
    return metrics


@torch.inference_mode()
def embed_items(
    embedder: Embedder,
    items: Sequence[Item],
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    amp: bool = False,
    with_mirror: bool = False,
) -> tuple[np.ndarray, ...]:
    """Embed (path, label) items with the embedder's eval transform; returns (float32 [N, D], int64 [N]).

    with_mirror: also embed each image's left-right mirror from the same decode (for test-time flip averaging);
    returns (plain, mirrored, labels) then.
    """
    device = torch.device(device) if device is not None else next(embedder.parameters()).device
    was_training = embedder.training
    embedder.eval()
    loader = DataLoader(
        ItemsDataset(items, embedder.preprocess), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    num_views = 2 if with_mirror else 1
    chunks: list[list[torch.Tensor]] = [[] for _ in range(num_views)]
    labels = []
    for pixels, y in loader:
        pixels = pixels.to(device, non_blocking=True)
        views = (pixels, pixels.flip(-1))[:num_views]
        for view, view_chunks in zip(views, chunks, strict=True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                view_chunks.append(embedder(view).float().cpu())
        labels.append(y)
    embedder.train(was_training)
    if not labels:
        return (*[np.zeros((0, embedder.dim), np.float32)] * num_views, np.zeros(0, np.int64))
    return (*[torch.cat(c).numpy() for c in chunks], torch.cat(labels).numpy().astype(np.int64))


def evaluate_items(
    embedder: Embedder,
    items: Sequence[Item],
    ks: Sequence[int] = DEFAULT_KS,
    gallery_items: Sequence[Item] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Embed and evaluate: leave-one-out over `items`, or `items` as queries against `gallery_items`."""
    emb, labels = embed_items(embedder, items, batch_size, num_workers, device, amp)
    if gallery_items is None:
        return evaluate_embeddings(emb, labels, ks)
    g_emb, g_labels = embed_items(embedder, gallery_items, batch_size, num_workers, device, amp)
    return evaluate_embeddings(emb, labels, ks, g_emb, g_labels)


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


def _items_from_config(config_path: str, overrides: Sequence[str], split: str) -> list[Item]:
    """The train, val or test items of a training config's `data:` section, split exactly as training split them."""
    from models.train import dataset_splits, load_config

    train, val, test = dataset_splits(load_config(config_path, overrides).data)
    return {"train": train, "val": val, "test": test}[split]


def cli(argv: list[str] | None = None) -> int:
    from models.train import add_override_option  # models.train imports this module

    parser = argparse.ArgumentParser(prog="retrieval eval", description="Recall@K, MAP@R, R-precision of an embedder.")
    parser.add_argument("--model", required=True, help="a preset name (models.zoo.PRESETS) or a checkpoint directory")
    parser.add_argument("--dataset", choices=("cub", "folder", "csv"), default="cub")
    parser.add_argument("--root", help="dataset root (or the query CSV's image root)")
    parser.add_argument("--csv", help="CSV manifest (path,label) for --dataset csv; the queries for In-Shop")
    parser.add_argument("--gallery-csv", help="query/gallery protocol: the gallery CSV (In-Shop)")
    parser.add_argument("--classes", help="keep labels in [A, B), e.g. 50:100 for cub100's test half")
    parser.add_argument(
        "--config", help="take the images from this training config's data section instead of --root/--classes"
    )
    parser.add_argument(
        "--split", choices=("train", "val", "test"), default="test", help="with --config: which of its splits"
    )
    add_override_option(parser, "with --config: override a config value as `retrieval train` does")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", help="also write the metrics JSON here")
    parser.add_argument(
        "--flip-average",
        action="store_true",
        help="average each image's embedding with its mirror image's (2x cost); the plain metrics come along",
    )
    args = parser.parse_args(argv)
    if (args.config is None) == (args.root is None):
        parser.error("give exactly one of --root (a dataset) or --config (a training config's split)")
    if args.config and args.gallery_csv:
        parser.error("--gallery-csv goes with --root, not --config")
    if args.overrides and not args.config:
        parser.error("--set goes with --config")

    from models.embedder import resolve_device
    from models.zoo import create_embedder

    device = resolve_device(args.device)
    embedder = create_embedder(args.model).to(device)
    # Mirrors are embedded below, so the plain and the flip-averaged metrics come from one run.
    flip_average = args.flip_average or embedder.config.flip_average
    embedder.config.flip_average = False
    if args.config:
        items = _items_from_config(args.config, args.overrides, args.split)
    else:
        items = load_eval_items(args.dataset, args.root, args.classes, args.csv)
    if not items:
        parser.error("no images selected")
    gallery = load_eval_items("csv", args.root, args.classes, args.gallery_csv) if args.gallery_csv else None

    def embed(chosen: Sequence[Item]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if not flip_average:
            plain, labels = embed_items(embedder, chosen, args.batch_size, args.workers, device)
            return {"plain": plain}, labels
        plain, mirror, labels = embed_items(embedder, chosen, args.batch_size, args.workers, device, with_mirror=True)
        flip = average_with_mirror(torch.from_numpy(plain), torch.from_numpy(mirror)).numpy()
        return {"plain": plain, "flip": flip}, labels

    query_views, labels = embed(items)
    gallery_views, gallery_labels = embed(gallery) if gallery is not None else ({}, None)

    def metrics_of(view: str) -> dict:
        return evaluate_embeddings(query_views[view], labels, args.ks, gallery_views.get(view), gallery_labels)

    if flip_average:
        metrics: dict = metrics_of("flip")
        metrics["without_flip_average"] = metrics_of("plain")
    else:
        metrics = metrics_of("plain")
    metrics["num_queries"] = len(items)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
