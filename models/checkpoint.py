"""The one checkpoint format: a directory with `model.safetensors` (weights) and `config.json`.

config.json holds the EmbedderConfig (arch, backbone, dim, image size, resize, mean/std, pooling, extras) plus a
format version, so any embedder can be rebuilt and fed exactly as it was trained, with no code-side defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.embedder import Embedder, EmbedderConfig, from_config

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(model: Embedder, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically: into a temporary sibling directory, then rename into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        meta = {"format_version": FORMAT_VERSION, "embedder": model.config.to_dict(), "extra": extra or {}}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> EmbedderConfig:
    meta = json.loads((Path(directory) / CONFIG).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {meta.get('format_version')!r} in {directory}")
    return EmbedderConfig.from_dict(meta["embedder"])


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Embedder:
    directory = Path(directory)
    config = read_config(directory)
    config.pretrained = "none"  # the checkpoint carries the weights
    model = from_config(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    return model.to(device).eval()


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()
