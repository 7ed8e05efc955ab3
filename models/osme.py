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

from models.embedder import EmbedderConfig, LocalFeatures, PartsEmbedder, pool, project_locations, register
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

    def _masked_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """U * m_p for every part p."""
        fmap = self.backbone.forward_features(pixels)
        squeezed = fmap.mean(dim=(2, 3))  # the one squeeze
        return [fmap * excite(squeezed)[:, :, None, None] for excite in self.excitations]

    def forward_parts(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self._masked_maps(pixels)
        parts = [fc(pool(masked, self.config.pooling)) for masked, fc in zip(maps, self.part_fcs, strict=True)]
        return F.normalize(torch.stack(parts, dim=1), dim=-1)

    def forward_local(self, pixels: torch.Tensor) -> LocalFeatures:
        """Masks: OSME's excitations are channel masks, so each part's spatial map is its masked activation
        (U * m_p averaged over channels), scaled to [0, 1] per image."""
        maps = self._masked_maps(pixels)
        parts = [fc(pool(masked, self.config.pooling)) for masked, fc in zip(maps, self.part_fcs, strict=True)]
        scale = len(maps) ** 0.5
        embedding = F.normalize(torch.stack(parts, dim=1), dim=-1).flatten(1) / scale
        local = torch.cat([project_locations(mp, fc) for mp, fc in zip(maps, self.part_fcs, strict=True)], 1)
        activation = torch.stack([mp.clamp(min=0).mean(dim=1) for mp in maps], dim=1)
        masks = activation / activation.flatten(2).amax(dim=2).clamp(min=1e-6)[:, :, None, None]
        return LocalFeatures(embedding, local / scale, masks)


__all__ = ["Excitation", "OSMEEmbedder"]
