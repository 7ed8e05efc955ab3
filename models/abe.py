"""ABE-M (Kim et al. 2018): attention-based ensemble on a shared timm CNN trunk.

The trunk is split at a configurable stage into a spatial extractor S (stem + stages[: split_stage + 1]) and a
global embedding G (the remaining stages, the trunk's tail, pooling and a linear embedding to dim / M). M attention
modules A_m (3x3 conv-BN-ReLU, then a 1x1 conv + sigmoid) each produce a mask the shape of S(x); learner m is
B_m(x) = G(S(x) * A_m(S(x))). S and G are shared. `forward_parts` gives the M L2-normalised learner embeddings
[B, M, dim / M]; `forward` their concatenation, scaled by 1/sqrt(M) so it is L2-normalised too (the cosine
similarity of two ensembles is then the mean of the learners' cosine similarities).

extra: num_learners (M, default 4), split_stage (default: the third-last stage), attention_channels (width of the
3x3 conv; default = S's channels), backbone_kwargs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.embedder import EmbedderConfig, LocalFeatures, PartsEmbedder, pool, project_locations, register
from models.pretrained import create_backbone
from models.trunk import channels_after, run_modules, trunk_layout


class AttentionModule(nn.Module):
    """A_m: a mask in (0, 1) the shape of its input map."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.mask = nn.Conv2d(hidden, channels, 1)
        # Start with masks near 1 so the pretrained G first sees (almost) the features it was trained on.
        nn.init.constant_(self.mask.bias, 2.0)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mask(self.body(fmap)))


@register("abe")
class ABEEmbedder(PartsEmbedder):
    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config)
        self.num_parts = int(config.extra.get("num_learners", 4))
        if config.dim % self.num_learners:
            raise ValueError(f"dim {config.dim} must be divisible by num_learners {self.num_learners}")
        self.trunk = create_backbone(config.backbone, config.pretrained, **config.extra.get("backbone_kwargs", {}))
        layout = trunk_layout(self.trunk)
        split = int(config.extra.get("split_stage", max(len(layout.stages) - 3, 0)))
        if not 0 <= split < len(layout.stages) - 1:
            raise ValueError(f"split_stage must be in [0, {len(layout.stages) - 2}] for {config.backbone}")
        self.spatial_names = layout.stem + layout.stages[: split + 1]
        self.global_names = layout.stages[split + 1 :] + layout.tail
        channels = channels_after(self.trunk, self.spatial_names)
        hidden = int(config.extra.get("attention_channels", channels))
        self.attention = nn.ModuleList(AttentionModule(channels, hidden) for _ in range(self.num_learners))
        self.embedding = nn.Linear(self.trunk.num_features, config.dim // self.num_learners)

    @property
    def num_learners(self) -> int:
        return self.num_parts

    def backbone_modules(self) -> list[nn.Module]:
        return [self.trunk]

    def spatial(self, pixels: torch.Tensor) -> torch.Tensor:
        """S(x): [B, C, H, W]."""
        return run_modules(self.trunk, self.spatial_names, pixels)

    def attention_masks(self, fmap: torch.Tensor) -> torch.Tensor:
        """A_m(S(x)) for every m: [B, M, C, H, W]."""
        return torch.stack([a(fmap) for a in self.attention], dim=1)

    def global_embedding(self, fmap: torch.Tensor) -> torch.Tensor:
        """G: map [N, C, H, W] -> un-normalised embedding [N, dim / M]."""
        out = run_modules(self.trunk, self.global_names, fmap)
        pooled = pool(out, self.config.pooling)
        return self.embedding(pooled)

    def forward_parts(self, pixels: torch.Tensor) -> torch.Tensor:
        """The M learners' L2-normalised embeddings, [B, M, dim / M]."""
        fmap = self.spatial(pixels)
        attended = fmap.unsqueeze(1) * self.attention_masks(fmap)  # [B, M, C, H, W]
        b, m = attended.shape[:2]
        learners = self.global_embedding(attended.flatten(0, 1))  # G is shared: run all learners as one batch
        return F.normalize(learners.view(b, m, -1), dim=-1)

    def forward_local(self, pixels: torch.Tensor) -> LocalFeatures:
        """Each learner's map before pooling, projected by the shared embedding layer; the local feature is the
        learners' concatenation / sqrt(M) like the descriptor. Masks: each A_m averaged over channels."""
        fmap = self.spatial(pixels)
        masks = self.attention_masks(fmap)
        b, m = masks.shape[:2]
        out = run_modules(self.trunk, self.global_names, (fmap.unsqueeze(1) * masks).flatten(0, 1))
        learners = F.normalize(self.embedding(pool(out, self.config.pooling)).view(b, m, -1), dim=-1)
        local = project_locations(out, self.embedding)  # [B * M, d, h, w]
        local = local.reshape(b, m * local.shape[1], *local.shape[2:]) / m**0.5
        return LocalFeatures(learners.flatten(1) / m**0.5, local, masks.mean(dim=2))


__all__ = ["ABEEmbedder", "AttentionModule"]
