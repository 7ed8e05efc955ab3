"""The training config (a YAML file; `configs/`), with `KEY=VALUE` overrides parsed by `parse_override`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from models.embedder import EmbedderConfig
from models.evaluate import DEFAULT_KS
from models.zoo import PRESETS


@dataclass
class TrainConfig:
    embedder: dict[str, Any] = field(default_factory=lambda: {"preset": "efficientnet_lite0"})
    # The IRT recipe. The paper's contrastive scaling matters: with PML's mean over non-zero pairs, KoLeo 0.7
    # overwhelms the contrastive term (docs/quality.md).
    loss: dict[str, Any] = field(
        default_factory=lambda: {"name": "contrastive_xbm", "koleo": 0.7, "reduction": "sum_per_anchor"}
    )
    data: dict[str, Any] = field(default_factory=dict)  # only used by the CLI / bench to find the items
    steps: int = 2000
    batch_size: int = 64
    m_per_class: int = 4
    lr: float = 3e-5
    head_lr: float | None = None  # default: 10 x lr
    loss_lr: float | None = None  # default: 100 x lr (proxies learn fast, as in Proxy-Anchor)
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    freeze_bn: bool = True  # keep the pretrained trunk's BatchNorm statistics (standard when fine-tuning for DML)
    # Module paths (fnmatch globs) left at their pretrained values, e.g. a CNN trunk's early stages: with a few
    # thousand images, tuning only the late stages transfers as well to unseen classes and trains ~2x faster.
    freeze: list[str] = field(default_factory=list)
    eval_at_start: bool = True  # validate the initial weights too, so fine-tuning can never make "best" worse
    amp: bool = True
    seed: int = 0
    num_workers: int = 2
    eval_every: int = 0  # 0: once per epoch
    checkpoint_every: int = 200
    log_every: int = 10
    eval_batch_size: int = 128
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def embedder_config(self) -> EmbedderConfig:
        """The `embedder:` section: EmbedderConfig fields, optionally on top of a zoo preset ("preset": name)."""
        section = dict(self.embedder)
        base = PRESETS[section.pop("preset")].to_dict() if "preset" in section else {}
        extra = {**base.get("extra", {}), **section.pop("extra", {})}
        return EmbedderConfig.from_dict({**base, **section, "extra": extra})


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value parsed as YAML); ValueError without a key and an "=" sign."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE (e.g. steps=100 or data.root=/data), got {text!r}")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def load_config(path: str | Path, overrides: Iterable[tuple[str, Any]] = ()) -> TrainConfig:
    """A YAML training config, with (dotted key, value) overrides, e.g. from `parse_override`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    for dotted, value in overrides:
        section = data
        *parents, last = dotted.split(".")
        for key in parents:
            section = section.setdefault(key, {})
        section[last] = value
    return TrainConfig.from_dict(data)


__all__ = ["TrainConfig", "load_config", "parse_override"]
