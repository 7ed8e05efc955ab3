"""Trunk ensemble: several timm trunks see the same image; each pooled descriptor is L2-normalised, and the
concatenation (re-normalised) is the embedding.

Two small ImageNet trunks that differ in width and depth make different mistakes on fine-grained classes, so
their joint descriptor retrieves better than either alone (docs/quality.md: EfficientNet-Lite0 + Lite1). It is
an embedder like any other: one checkpoint, one eval transform, trained end to end by models.train with any loss
that takes a single embedding.

Options (EmbedderConfig):
- backbone: the trunks joined by "+", e.g. "tf_efficientnet_lite0+tf_efficientnet_lite1".
- pooling: "avg" / "mean" or "gem", applied to every trunk's final feature map (CNN trunks only).
- dim: the sum of the trunks' widths (checked).
- pretrained: as for any embedder ("package", "none", ...), applied to every trunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.embedder import Embedder, EmbedderConfig, LocalFeatures, pool, register
from models.pretrained import create_backbone

POOLINGS = ("avg", "mean", "gem")


@register("ensemble")
class EnsembleEmbedder(Embedder):
    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config)
        names = [name for name in config.backbone.split("+") if name]
        if len(names) < 2:
            raise ValueError(f"an ensemble needs at least two trunks joined by '+', got {config.backbone!r}")
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {config.pooling!r}")
        self.backbones = nn.ModuleList(create_backbone(name, config.pretrained) for name in names)
        widths = [trunk.num_features for trunk in self.backbones]
        if config.dim != sum(widths):
            raise ValueError(f"dim must be the sum of the trunk widths {widths} = {sum(widths)}, got {config.dim}")

    def backbone_modules(self) -> list[nn.Module]:
        return list(self.backbones)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        parts = []
        for trunk in self.backbones:
            fmap = trunk.forward_features(pixels)
            pooled = pool(fmap, self.config.pooling)
            parts.append(F.normalize(pooled, dim=-1))
        # Each part has unit norm, so dividing by sqrt(n) gives a unit vector with every trunk weighted equally.
        return torch.cat(parts, dim=-1) / math.sqrt(len(parts))

    def forward_local(self, pixels: torch.Tensor) -> LocalFeatures:
        """Each trunk's map, L2-normalised per location (its pooled feature's only "projection"), resized to the
        first trunk's grid and concatenated / sqrt(n) like the descriptor."""
        embeddings, maps = [], []
        for trunk in self.backbones:
            fmap = trunk.forward_features(pixels)
            embeddings.append(F.normalize(pool(fmap, self.config.pooling), dim=-1))
            local = F.normalize(fmap, dim=1)
            if maps and local.shape[2:] != maps[0].shape[2:]:
                local = F.normalize(F.interpolate(local, size=maps[0].shape[2:], mode="bilinear"), dim=1)
            maps.append(local)
        scale = math.sqrt(len(maps))
        return LocalFeatures(torch.cat(embeddings, dim=-1) / scale, torch.cat(maps, dim=1) / scale)


__all__ = ["EnsembleEmbedder"]
