"""What training optimises and how: parameter groups with their learning rates, the schedule, frozen parameters
and frozen BatchNorm statistics. The embedder says which parameters are its pretrained trunk
(`Embedder.backbone_modules`); nothing here guesses from attribute names."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from models.config import TrainConfig
from models.embedder import Embedder


def optimizer_groups(embedder: Embedder, loss: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: the trunk at `lr`, the embedder's new layers at `head_lr`
    (default 10 x lr), the loss's own parameters (proxies, classifiers) at `loss_lr` (default 100 x lr)."""
    groups = embedder.parameter_groups()
    head_lr = config.head_lr if config.head_lr is not None else 10 * config.lr
    loss_lr = config.loss_lr if config.loss_lr is not None else 100 * config.lr
    candidates = [
        {"params": groups["backbone"], "lr": config.lr, "name": "backbone"},
        {"params": groups["head"], "lr": head_lr, "name": "head"},
        {"params": list(loss.parameters()), "lr": loss_lr, "name": "loss"},
    ]
    for group in candidates:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    return [group for group in candidates if group["params"]]


def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """The factor on each group's lr at a step: linear warm-up, then cosine decay to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

    return factor


def freeze_parameters(embedder: Embedder, patterns: Sequence[str]) -> None:
    """requires_grad=False for the parameters under any of `patterns`: dotted module paths whose parts are fnmatch
    globs, e.g. "backbone.blocks.[0-4]" or "backbones.*.conv_stem" (a "*" never crosses a dot). A pattern that
    matches nothing is an error."""

    def under(name: str, pattern: str) -> bool:
        parts, globs = name.split("."), pattern.split(".")
        return len(parts) >= len(globs) and all(map(fnmatch.fnmatchcase, parts, globs))

    names = [name for name, _ in embedder.named_parameters()]
    for pattern in patterns:
        if not any(under(name, pattern) for name in names):
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter of the embedder (e.g. {names[0]!r})")
    for name, param in embedder.named_parameters():
        if any(under(name, pattern) for pattern in patterns):
            param.requires_grad_(False)


def set_train_mode(model: nn.Module, embedder: Embedder, freeze_bn: bool) -> None:
    """Train mode, except (freeze_bn) the trunk's BatchNorm layers, which keep their pretrained statistics."""
    model.train()
    if freeze_bn:
        for trunk in embedder.backbone_modules():
            for module in trunk.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


__all__ = ["freeze_parameters", "lr_schedule", "optimizer_groups", "set_train_mode"]
