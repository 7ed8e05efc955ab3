"""OSME (Sun et al. 2018, MAMC): one squeeze, P excitations, P part features on a timm CNN trunk.

From the last conv map U [B, C, H, W]: one squeeze z = GAP(U); P excitation branches (FC-ReLU-FC-sigmoid, as in
SENet) give channel masks m_p; part feature f^p = W_p GAP(U * m_p), dim / P wide. `forward_parts` returns the P
L2-normalised parts [B, P, dim / P]; `forward` their concatenation / sqrt(P) (L2-normalised).

extra: num_parts (P, default 2), reduction (SE bottleneck ratio, default 16), backbone_kwargs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.embedder import EmbedderConfig, PartsEmbedder, pool, register
from models.pretrained import create_backbone


class Excitation(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.body = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, squeezed: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(squeezed))


@register("osme")
class OSMEEmbedder(PartsEmbedder):
    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config)
        self.num_parts = int(config.extra.get("num_parts", 2))
        if config.dim % self.num_parts:
            raise ValueError(f"dim {config.dim} must be divisible by num_parts {self.num_parts}")
        self.backbone = create_backbone(config.backbone, config.pretrained, **config.extra.get("backbone_kwargs", {}))
        channels = self.backbone.num_features
        reduction = int(config.extra.get("reduction", 16))
        self.excitations = nn.ModuleList(Excitation(channels, reduction) for _ in range(self.num_parts))
        part_dim = config.dim // self.num_parts
        self.part_fcs = nn.ModuleList(nn.Linear(channels, part_dim) for _ in range(self.num_parts))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def forward_parts(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_features(pixels)
        squeezed = fmap.mean(dim=(2, 3))  # the one squeeze
        parts = []
        for excite, fc in zip(self.excitations, self.part_fcs, strict=True):
            masked = fmap * excite(squeezed)[:, :, None, None]
            pooled = pool(masked, self.config.pooling)
            parts.append(fc(pooled))
        return F.normalize(torch.stack(parts, dim=1), dim=-1)


__all__ = ["Excitation", "OSMEEmbedder"]
