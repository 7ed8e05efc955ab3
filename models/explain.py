"""Why did this match: similarity heatmaps from one forward pass per image (pure torch).

For a query q and a result r, each image gets a map over its model-input crop: at every location, the cosine
between that location's local feature (before pooling, projected like the pooled one: `Embedder.forward_local`)
and the *other* image's embedding. Where the map is high, that region looks like the other image as a whole; for
average pooling the map's mean is the pair's score up to the pooled feature's norm. The query's `LocalFeatures`
are computed once and explain it against every result.

ABE-M and OSME also give their attention masks per learner / part (`LocalFeatures.masks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.embedder import Embedder, LocalFeatures


@dataclass
class PairMaps:
    """Heatmaps of n (query, result) pairs: cosines in [-1, 1]."""

    query: torch.Tensor  # [n, h, w]: the query's locations against each result's embedding
    result: torch.Tensor  # [n, h, w]: each result's locations against the query's embedding
    scores: torch.Tensor  # [n]: cosine of the two embeddings


def similarity_maps(local: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """local [B, D, h, w] (L2-normalised per location), embeddings [B, D] -> cosines [B, h, w]."""
    return torch.einsum("bdhw,bd->bhw", local.float(), embeddings.float()).clamp(-1.0, 1.0)


def pair_maps(query: LocalFeatures, results: LocalFeatures) -> PairMaps:
    """The query (batch of one) against each of n results."""
    n = results.embedding.shape[0]
    query_local = query.local[:1].expand(n, *query.local.shape[1:])
    query_embedding = query.embedding[:1].expand(n, -1)
    return PairMaps(
        query=similarity_maps(query_local, results.embedding),
        result=similarity_maps(results.local, query_embedding),
        scores=(results.embedding.float() @ query.embedding[0].float()).clamp(-1.0, 1.0),
    )


@torch.inference_mode()
def local_features(embedder: Embedder, pixels: torch.Tensor, batch_size: int = 32) -> LocalFeatures:
    """`forward_local` in eval mode over preprocessed images [N, 3, H, W], batched, on the embedder's device;
    results on the CPU in float32."""
    was_training = embedder.training
    embedder.eval()
    device = next(embedder.parameters()).device
    outs = [embedder.forward_local(pixels[i : i + batch_size].to(device)) for i in range(0, len(pixels), batch_size)]
    embedder.train(was_training)
    masks = [o.masks for o in outs]
    return LocalFeatures(
        torch.cat([o.embedding for o in outs]).float().cpu(),
        torch.cat([o.local for o in outs]).float().cpu(),
        torch.cat(masks).float().cpu() if all(m is not None for m in masks) and masks else None,
    )


def mass_inside(heatmap: torch.Tensor, box: tuple[float, float, float, float]) -> float:
    """Share of a map's heat inside a box (x0, y0, x1, y1 as fractions of its width and height), each cell counted
    by the fraction of it the box covers. Heat is measured above the map's coldest cell (as the page shows it):
    cosines of non-negative CNN features are all positive, and a baseline everywhere says nothing about where."""
    h, w = heatmap.shape[-2:]
    positive = heatmap.float() - heatmap.float().min()
    total = float(positive.sum())
    if total <= 0:
        return 0.0

    def cover(lo: float, hi: float, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float32) / cells
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp(
            min=0
        ) * cells

    x0, y0, x1, y1 = box
    weights = cover(y0, y1, h)[:, None] * cover(x0, x1, w)[None, :]
    return float((positive * weights).sum()) / total


__all__ = ["PairMaps", "local_features", "mass_inside", "pair_maps", "similarity_maps"]
