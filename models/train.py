"""Training: metric learning of any registered embedder, on CPU, one GPU, or several processes under torchrun (DDP).

Programmatic API (what the training worker calls):

    config = TrainConfig.from_dict(yaml.safe_load(text))       # or load_config(path, overrides)
    result = train(
        config,                      # TrainConfig
        train_items,                 # list[(image_path, label)]; labels any ints (remapped to 0..C-1 inside)
        val_items,                   # list[(image_path, label)] held out (other images or other classes); may be []
        out_dir,                     # Path; resumes automatically from out_dir/resume.pt when present
        init_checkpoint=None,        # a checkpoint dir to fine-tune (its EmbedderConfig replaces config.embedder)
        device="auto",               # "auto" | "cpu" | "cuda" | "cuda:1" | torch.device
        progress=None,               # Callable[[dict], None]: every log record (train steps and validations)
        should_stop=None,            # Callable[[], bool]: polled each step; True saves a resume state and returns
    )
    result.best_checkpoint_dir       # out_dir/"best": the checkpoint with the best validation MAP@R
    result.metrics                   # that checkpoint's validation metrics (recall@K, map@r, r_precision)

What it does: AdamW (backbone at `lr`, new heads at `head_lr`, loss parameters such as proxies at `loss_lr`),
linear warm-up then cosine decay, bf16 autocast on CUDA when `amp`, gradient clipping, class-balanced batches
(`m_per_class` images per class, PML's MPerClassSampler), validation every `eval_every` steps (default: once per
epoch), best checkpoint by validation MAP@R (never a test split), a resume state every `checkpoint_every` steps
(atomically replaced; a killed run restarts from the last one), a JSON-lines log (out_dir/log.jsonl), a tqdm bar.
Seeded: the batches of each epoch are a pure function of (seed, epoch, rank).

DDP: under `torchrun --nproc_per_node N`, each process takes batch_size / N images per step; gradients (including
loss parameters) are all-reduced; the cross-batch memory is per process; rank 0 validates and writes files;
`should_stop` returning True on any rank stops every rank.

CLI: `retrieval train --config configs/irt_cub100.yaml [--out DIR] [--set key=value ...]` (see `cli`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from models.checkpoint import load_checkpoint, read_config, save_checkpoint
from models.data import Item, ItemsDataset, m_per_class_batches, select_classes, split_items, train_transform
from models.embedder import Embedder, EmbedderConfig, build_embedder, resolve_device
from models.evaluate import DEFAULT_KS, evaluate_items
from models.irt import fit_pca_on_items, has_pca
from models.losses import RetrievalLoss, build_loss

RESUME_FILE = "resume.pt"
LOG_FILE = "log.jsonl"
BACKBONE_PREFIXES = ("backbone.", "backbones.", "trunk.")  # pretrained trunk parameters (lr, frozen BN)


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
        base: dict[str, Any] = {}
        if "preset" in section:
            from models.zoo import PRESETS

            base = PRESETS[section.pop("preset")].to_dict()
        extra = {**base.get("extra", {}), **section.pop("extra", {})}
        return EmbedderConfig.from_dict({**base, **section, "extra": extra})


@dataclass
class TrainResult:
    best_checkpoint_dir: Path
    last_checkpoint_dir: Path | None
    metrics: dict[str, float]
    step: int
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _set_by_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def add_override_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY=VALUE` (repeatable) into args.overrides, the form load_config takes."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A YAML training config, with `key.sub=value` overrides (values parsed as YAML)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, _, value = item.partition("=")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        _set_by_path(data, key.strip(), parsed)
    return TrainConfig.from_dict(data)


class _TrainingModel(nn.Module):
    """Embedder + loss in one module, so DDP all-reduces the loss's own parameters (proxies) too."""

    def __init__(self, embedder: Embedder, loss: RetrievalLoss, amp: bool) -> None:
        super().__init__()
        self.embedder = embedder
        self.loss = loss
        self.amp = amp

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp and pixels.is_cuda):
            if hasattr(self.embedder, "forward_parts"):
                parts = self.embedder.forward_parts(pixels).float()
                embedding = F.normalize(parts.flatten(1), dim=-1)
            else:
                parts, embedding = None, self.embedder(pixels).float()
        return self.loss(embedding, labels, parts)


def _distributed(device: torch.device | str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device) if isinstance(device, str) else device
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on any: all ranks must leave the loop together or DDP deadlocks."""
    if world <= 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

    return factor


def _param_groups(model: _TrainingModel, config: TrainConfig) -> list[dict[str, Any]]:
    backbone, head = [], []
    for name, param in model.embedder.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith(BACKBONE_PREFIXES) else head).append(param)
    loss_params = [p for p in model.loss.parameters() if p.requires_grad]
    groups = [
        {"params": backbone, "lr": config.lr, "name": "backbone"},
        {"params": head, "lr": config.head_lr if config.head_lr is not None else 10 * config.lr, "name": "head"},
        {
            "params": loss_params,
            "lr": config.loss_lr if config.loss_lr is not None else 100 * config.lr,
            "name": "loss",
        },
    ]
    return [g for g in groups if g["params"]]


def _freeze_parameters(embedder: Embedder, patterns: Sequence[str]) -> None:
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


def _train_mode(model: _TrainingModel, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for name, module in model.embedder.named_modules():
            if name.startswith(BACKBONE_PREFIXES) and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _evaluate(embedder: Embedder, items: Sequence[Item], config: TrainConfig, device: torch.device) -> dict:
    return evaluate_items(
        embedder,
        items,
        config.ks,
        batch_size=config.eval_batch_size,
        num_workers=config.num_workers,
        device=device,
        amp=config.amp,
    )


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _epoch_batches(
    labels: list[int], config: TrainConfig, per_rank: int, steps: int, epoch: int, rank: int, world: int
):
    return m_per_class_batches(
        labels, config.m_per_class, per_rank, steps, seed=config.seed * 100_003 + epoch * world + rank
    )


def train(
    config: TrainConfig,
    train_items: Sequence[Item],
    val_items: Sequence[Item],
    out_dir: str | Path,
    init_checkpoint: str | Path | None = None,
    device: torch.device | str = "auto",
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train (or resume training) an embedder; see the module docstring."""
    out_dir = Path(out_dir)
    rank, world, device = _distributed(device)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(config.seed + rank)

    if init_checkpoint is not None:
        embedder_config = read_config(init_checkpoint)
        embedder = load_checkpoint(init_checkpoint).train()
    else:
        embedder_config = config.embedder_config()
        embedder = build_embedder(embedder_config)
    if init_checkpoint is None and has_pca(embedder) and not (out_dir / RESUME_FILE).is_file():
        fit_pca_on_items(embedder, train_items)  # a fresh PCA head: fitted once, then carried by the weights
    classes = sorted({label for _, label in train_items})
    remap = {label: i for i, label in enumerate(classes)}
    train_items = [(path, remap[label]) for path, label in train_items]
    labels = [label for _, label in train_items]
    num_parts = int(getattr(embedder, "num_learners", getattr(embedder, "num_parts", 0)))
    loss_fn = build_loss(config.loss, embedder.dim, len(classes), num_parts)
    _freeze_parameters(embedder, config.freeze)
    model = _TrainingModel(embedder, loss_fn, config.amp).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, config), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))

    step, best_metric, best_metrics, history = 0, -1.0, {}, []
    resume_path = out_dir / RESUME_FILE
    if resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loss_fn.load_memory_state(state["loss_memory"])
        step, best_metric, best_metrics = state["step"], state["best_metric"], state["best_metrics"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])

    train_module: nn.Module = model
    if world > 1:
        train_module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    per_rank = config.batch_size // world
    steps_per_epoch = max(1, len(train_items) // config.batch_size)
    eval_every = config.eval_every or steps_per_epoch
    # All remaining batches, epoch by epoch, regenerated identically on resume.
    first_epoch, skip = divmod(step, steps_per_epoch)
    batches: list[list[int]] = []
    for epoch in range(first_epoch, math.ceil(config.steps / steps_per_epoch)):
        epoch_batches = _epoch_batches(labels, config, per_rank, steps_per_epoch, epoch, rank, world)
        batches.extend(epoch_batches[skip:] if epoch == first_epoch else epoch_batches)
    batches = batches[: max(0, config.steps - step)]
    loader = DataLoader(
        ItemsDataset(train_items, train_transform(embedder_config)),
        batch_sampler=batches,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    log_path = out_dir / LOG_FILE

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if progress is not None:
                progress(entry)

    def save_resume() -> None:
        if is_main:
            _atomic_torch_save(
                {
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "loss_memory": loss_fn.memory_state(),
                    "best_metric": best_metric,
                    "best_metrics": best_metrics,
                    "torch_rng": torch.get_rng_state(),
                    "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate(),
                    "config": config.to_dict(),
                },
                resume_path,
            )

    validated = False  # on every rank (best_metric is only known on rank 0)

    def validate() -> None:
        nonlocal best_metric, best_metrics, validated
        validated = True
        if is_main:
            if val_items:
                metrics = _evaluate(embedder, val_items, config, device)
            else:
                metrics = {"map@r": float(step)}  # no validation split: the latest is the best
            record({"event": "val", "step": step, "epoch": step / steps_per_epoch, **metrics})
            if metrics["map@r"] > best_metric:
                best_metric, best_metrics = metrics["map@r"], metrics
                save_checkpoint(embedder, out_dir / "best", extra={"step": step, "val": metrics})
        if world > 1:
            dist.barrier()
        _train_mode(model, config.freeze_bn)  # evaluation left everything in train mode

    stopped = False
    bar = None
    if is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
    _train_mode(model, config.freeze_bn)
    if step == 0 and config.eval_at_start and config.steps > 0:
        validate()
    started = time.time()
    for pixels, batch_labels in loader:
        if _any_rank(should_stop is not None and should_stop(), world, device):
            stopped = True
            break
        pixels = pixels.to(device, non_blocking=True)
        batch_labels = batch_labels.to(device, non_blocking=True)
        total, terms = train_module(pixels, batch_labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total.item():.4f}")
        if step % config.log_every == 0 or step == config.steps:
            record(
                {
                    "event": "train",
                    "step": step,
                    "loss": total.item(),
                    **terms,
                    "grad_norm": float(grad_norm),
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": round(time.time() - started, 2),
                }
            )
        if step % eval_every == 0 or step == config.steps:
            validate()
        if step % config.checkpoint_every == 0:
            save_resume()
    if bar is not None:
        bar.close()
    if not validated and not stopped and not (out_dir / "best").is_dir():
        validate()  # resumed after the end, or zero steps: make sure a best checkpoint exists
    save_resume()
    last_dir = None
    if is_main and not stopped:
        last_dir = save_checkpoint(embedder, out_dir / "last", extra={"step": step})
    if world > 1:
        dist.barrier()
    return TrainResult(out_dir / "best", last_dir, best_metrics, step, stopped, history)


def dataset_splits(data: dict[str, Any]) -> tuple[list[Item], list[Item], list[Item]]:
    """(train, val, test) items from a config's `data:` section (kind "cub" or "folder"/"csv" with class ranges).

    data: root, kind ("cub"), train_classes [A, B], test_classes [C, D], val_fraction, val_split ("images" or
    "classes"), split_seed.
    """
    from models.evaluate import load_eval_items

    items = load_eval_items(data.get("kind", "cub"), data["root"], csv_path=data.get("csv"))
    train_range, test_range = data.get("train_classes"), data.get("test_classes")
    pool = select_classes(items, *train_range) if train_range else items
    test = select_classes(items, *test_range) if test_range else []
    train_part, val = split_items(
        pool, float(data.get("val_fraction", 0.15)), data.get("val_split", "images"), int(data.get("split_seed", 0))
    )
    return train_part, val, test


def run_config(
    config: TrainConfig, out_dir: str | Path, device: str = "auto", init_checkpoint: str | None = None
) -> dict[str, Any]:
    """Train from a config's data section, then evaluate the best checkpoint on the test classes."""
    train_items, val_items, test_items = dataset_splits(config.data)
    result = train(config, train_items, val_items, out_dir, init_checkpoint, device)
    summary: dict[str, Any] = {
        "step": result.step,
        "val": result.metrics,
        "best_checkpoint": str(result.best_checkpoint_dir),
    }
    if test_items and int(os.environ.get("RANK", "0")) == 0:
        dev = resolve_device(device) if isinstance(device, str) else device
        best = load_checkpoint(result.best_checkpoint_dir, dev)
        summary["test"] = _evaluate(best, test_items, config, dev)
        summary["num_test"] = len(test_items)
        (Path(out_dir) / "test_metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval train", description="Train an embedder from a YAML config.")
    parser.add_argument("--config", required=True, help="YAML training config (see configs/)")
    parser.add_argument("--out", help="output dir (default: runs/<config name>); resumes when it holds a resume state")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--init-checkpoint", help="fine-tune this checkpoint instead of config.embedder")
    add_override_option(parser, "override a config value, e.g. --set steps=100 --set data.root=/data/cub100")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    summary = run_config(config, out, args.device, args.init_checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
