"""Split a timm CNN into an ordered list of stages, so that an embedder can run "up to stage k" and "the rest".

Only module *names* are kept here: the backbone stays registered once, under one name, so the state dict has
no shared tensors (safetensors refuses them) and pretrained weights load into it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrunkLayout:
    stem: tuple[str, ...]  # run before the first stage
    stages: tuple[str, ...]  # dotted module paths, in order
    tail: tuple[str, ...]  # run after the last stage (e.g. EfficientNet's conv_head + bn2)


def trunk_layout(model: nn.Module) -> TrunkLayout:
    """Stage layout of the timm CNN families supported here (EfficientNet/MobileNet, ResNet, ConvNeXt-like)."""
    children = dict(model.named_children())
    if "blocks" in children and "conv_stem" in children:  # EfficientNet, MobileNetV2/V3
        stages = tuple(f"blocks.{i}" for i in range(len(children["blocks"])))
        tail = tuple(n for n in ("conv_head", "bn2", "norm_head", "act2") if n in children)
        return TrunkLayout(("conv_stem", "bn1"), stages, tail)
    if "layer1" in children:  # ResNet, ResNeXt, SE-ResNet
        stem = tuple(n for n in ("conv1", "bn1", "act1", "maxpool") if n in children)
        stages = tuple(n for n in ("layer1", "layer2", "layer3", "layer4") if n in children)
        return TrunkLayout(stem, stages, ())
    if "stages" in children and "stem" in children:  # ConvNeXt, RegNet-like, CSP
        stages = tuple(f"stages.{i}" for i in range(len(children["stages"])))
        tail = tuple(n for n in ("norm_pre", "final_conv") if n in children)
        return TrunkLayout(("stem",), stages, tail)
    raise ValueError(
        f"cannot split {type(model).__name__} into stages; supported: EfficientNet/MobileNet, ResNet, ConvNeXt"
    )


def run_modules(model: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    for name in names:
        x = model.get_submodule(name)(x)
    return x


def channels_after(model: nn.Module, names: tuple[str, ...], image_size: int = 64) -> int:
    """Channels of the map after running `names` (measured with a dummy forward, in eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = run_modules(model, names, torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return out.shape[1]
