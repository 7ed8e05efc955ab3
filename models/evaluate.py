"""Retrieval evaluation: Recall@K (for a list of K), MAP@R and R-precision.

Protocols: leave-one-out (CUB, Cars, SOP: every image queries all the others) and query/gallery (In-Shop).
Neighbours come from faiss (exact inner product on L2-normalised embeddings = cosine), on the GPU when faiss has
GPU support and CUDA is present, queried in chunks so 100k+ images fit in GPU memory; without faiss, an exact
chunked torch kNN (on the GPU when present). MAP@R and R-precision come from pytorch-metric-learning's
AccuracyCalculator; Recall@K for K > 1 is computed here.

Public API (`load_image`: path -> upright RGB PIL image, see models/data.py):
    evaluate_embeddings(embeddings, labels, ks=(1, 2, 4, 8), gallery_embeddings=None, gallery_labels=None) -> dict
        keys "recall@K" for each K, "map@r", "r_precision" (fractions in [0, 1]).
    embed_items(embedder, items, load_image, batch_size=64, num_workers=2, device=None) -> (embeddings, labels)
        with_mirror=True: (embeddings, mirror images' embeddings, labels), one decode per image
    evaluate_items(embedder, items, load_image, ks, gallery_items=None, ...) -> dict
    evaluate_with_flip_average(...) -> dict     (what `retrieval eval` prints: both with and without mirrors)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.data import Item, ItemsDataset, LoadImage
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

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

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

    def as_np(values: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)

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
    load_image: LoadImage,
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
    dataset = ItemsDataset(items, embedder.preprocess, load_image)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
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
    values = torch.cat(labels).numpy()
    if not np.issubdtype(values.dtype, np.floating):  # class ids; graded labels (models/graded.py) stay numbers
        values = values.astype(np.int64)
    return (*[torch.cat(c).numpy() for c in chunks], values)


def evaluate_items(
    embedder: Embedder,
    items: Sequence[Item],
    load_image: LoadImage,
    ks: Sequence[int] = DEFAULT_KS,
    gallery_items: Sequence[Item] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Embed and evaluate: leave-one-out over `items`, or `items` as queries against `gallery_items`."""
    emb, labels = embed_items(embedder, items, load_image, batch_size, num_workers, device, amp)
    if gallery_items is None:
        return evaluate_embeddings(emb, labels, ks)
    g_emb, g_labels = embed_items(embedder, gallery_items, load_image, batch_size, num_workers, device, amp)
    return evaluate_embeddings(emb, labels, ks, g_emb, g_labels)


def evaluate_with_flip_average(
    embedder: Embedder,
    items: Sequence[Item],
    load_image: LoadImage,
    ks: Sequence[int] = DEFAULT_KS,
    gallery_items: Sequence[Item] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    flip_average: bool = False,
) -> dict:
    """`retrieval eval`'s metrics. With flip averaging (asked for, or in the embedder's config) the metrics of the
    mirror-averaged embeddings, and the plain ones under "without_flip_average", from one decode per image."""
    configured = embedder.config.flip_average
    flip_average = flip_average or configured

    def embed(chosen: Sequence[Item]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if not flip_average:
            plain, labels = embed_items(embedder, chosen, load_image, batch_size, num_workers, device)
            return {"plain": plain}, labels
        plain, mirror, labels = embed_items(
            embedder, chosen, load_image, batch_size, num_workers, device, with_mirror=True
        )
        flip = average_with_mirror(torch.from_numpy(plain), torch.from_numpy(mirror)).numpy()
        return {"plain": plain, "flip": flip}, labels

    embedder.config.flip_average = False  # the mirrors are embedded here, so the plain embeddings come along
    try:
        query_views, labels = embed(items)
        gallery_views, gallery_labels = embed(gallery_items) if gallery_items is not None else ({}, None)
    finally:
        embedder.config.flip_average = configured

    def metrics_of(view: str) -> dict:
        return evaluate_embeddings(query_views[view], labels, ks, gallery_views.get(view), gallery_labels)

    if flip_average:
        metrics: dict = metrics_of("flip")
        metrics["without_flip_average"] = metrics_of("plain")
    else:
        metrics = metrics_of("plain")
    metrics["num_queries"] = len(items)
    return metrics


