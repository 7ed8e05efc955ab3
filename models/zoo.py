"""Named embedders and the module imports that register every arch with models.embedder."""

from __future__ import annotations

from models.embedder import Embedder, EmbedderConfig, build_embedder

# Each import registers its arch; keep this list in step with the models/ files.
ARCH_MODULES = ("models.irt", "models.abe", "models.osme")
for _module in ARCH_MODULES:
    try:
        __import__(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise

# EfficientNet-Lite: "same" padding, BN eps 1e-3, inputs normalised with mean = std = 0.5.
LITE_MEAN_STD = (0.5, 0.5, 0.5)

PRESETS: dict[str, EmbedderConfig] = {
    "efficientnet_lite0": EmbedderConfig(
        arch="timm",
        backbone="tf_efficientnet_lite0",
        dim=1280,
        image_size=224,
        resize_size=256,
        mean=LITE_MEAN_STD,
        std=LITE_MEAN_STD,
        pretrained="package",
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
