"""IRT embedder (El-Nouby et al. 2021): a timm ViT/DeiT whose pooled token features, L2-normalised, are the descriptor.

Options (EmbedderConfig):
- backbone: any timm model; ViT/DeiT give tokens [B, N, C], CNNs a map [B, C, H, W] (then "cls" is not allowed).
- pooling: "cls" (the class token, IRT's choice), "mean" (patch tokens / spatial mean) or "gem".
- pretrained: "timm" (timm's hub, needs internet), a local state-dict file, "package" or "none".
- dim + extra["projection"]: "linear" (learned) or "pca" (fitted with `fit_pca`; models.train fits it on the
  training images when a run starts fresh) when dim < the backbone width;
  "none" requires dim == the backbone width.
- extra["backbone_kwargs"]: passed to timm.create_model (e.g. {"img_size": 64}).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.data import Item, ItemsDataset, LoadImage
from models.embedder import Embedder, EmbedderConfig, LocalFeatures, pool, project_locations, register
from models.pretrained import create_backbone

POOLINGS = ("cls", "mean", "avg", "gem")
PROJECTIONS = ("none", "linear", "pca")


class PCAProjection(nn.Module):
    """x -> (x - mean) @ components.T; buffers, so a fitted PCA travels in the checkpoint."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("components", torch.eye(out_dim, in_dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        features = features.float()
        mean = features.mean(dim=0)
        # Right singular vectors of the centred data are the principal axes, largest first.
        _, _, vh = torch.linalg.svd(features - mean, full_matrices=False)
        k = self.components.shape[0]
        if vh.shape[0] < k:
            raise ValueError(f"PCA to {k} dims needs at least {k} samples, got {features.shape[0]}")
        self.mean.copy_(mean)
        self.components.copy_(vh[:k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.t()


@register("irt")
class IRTEmbedder(Embedder):
    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config)
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {config.pooling!r}")
        self.backbone = create_backbone(config.backbone, config.pretrained, **config.extra.get("backbone_kwargs", {}))
        width = self.backbone.num_features
        projection = config.extra.get("projection", "none" if config.dim == width else "linear")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if projection == "none" and config.dim != width:
            raise ValueError(f"dim {config.dim} != backbone width {width}: choose projection 'linear' or 'pca'")
        self.projection: nn.Module
        if projection == "linear":
            self.projection = nn.Linear(width, config.dim)
        elif projection == "pca":
            self.projection = PCAProjection(width, config.dim)
        else:
            self.projection = nn.Identity()

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features before projection and normalisation, [B, width]."""
        out = self.backbone.forward_features(pixels)
        pooling = self.config.pooling
        if out.dim() == 4:  # CNN map
            if pooling == "cls":
                raise ValueError(f"{self.config.backbone} has no class token; use pooling 'mean' or 'gem'")
            return pool(out, pooling)
        if pooling == "cls":
            return out[:, 0]
        patches = out[:, getattr(self.backbone, "num_prefix_tokens", 1) :]
        return pool(patches, pooling)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.features(pixels)), dim=-1)

    def forward_local(self, pixels: torch.Tensor) -> LocalFeatures:
        out = self.backbone.forward_features(pixels)
        if out.dim() == 4:  # CNN map
            fmap = out
            pooled = pool(out, self.config.pooling)
        else:  # ViT tokens: the patch tokens on their grid (square inputs, so a square grid)
            patches = out[:, getattr(self.backbone, "num_prefix_tokens", 1) :]
            side = int(round(patches.shape[1] ** 0.5))
            fmap = patches.transpose(1, 2).reshape(len(out), -1, side, patches.shape[1] // side)
            pooled = out[:, 0] if self.config.pooling == "cls" else pool(patches, self.config.pooling)
        embedding = F.normalize(self.projection(pooled), dim=-1)
        return LocalFeatures(embedding, project_locations(fmap, self.projection))

    @torch.no_grad()
    def fit_pca(self, pixels: torch.Tensor, batch_size: int = 64) -> None:
        """Fit the PCA projection on preprocessed images [N, 3, H, W] (N >= dim)."""
        if not isinstance(self.projection, PCAProjection):
            raise ValueError("this embedder was not configured with projection 'pca'")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        feats = torch.cat(
            [self.features(pixels[i : i + batch_size].to(device)) for i in range(0, len(pixels), batch_size)]
        )
        self.projection.fit(feats)
        self.train(was_training)


def fit_pca_on_items(
    embedder: IRTEmbedder, items: Sequence[Item], load_image: LoadImage, max_items: int = 2048
) -> None:
    """Fit a PCA projection on (a fixed sample of) image files, with the embedder's eval transform."""
    chosen = random.Random(0).sample(list(items), min(max_items, len(items)))
    dataset = ItemsDataset(chosen, embedder.preprocess, load_image)
    embedder.fit_pca(torch.stack([dataset[i][0] for i in range(len(dataset))]))


def has_pca(embedder: nn.Module) -> bool:
    return isinstance(getattr(embedder, "projection", None), PCAProjection)


__all__ = ["IRTEmbedder", "PCAProjection", "fit_pca_on_items", "has_pca"]
