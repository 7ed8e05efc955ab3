"""Training: metric learning of any registered embedder, on CPU, one GPU, or several processes under torchrun (DDP).

Programmatic API (what the training worker and `retrieval train` call):

    config = load_config(path, overrides)                      # models.config; or TrainConfig.from_dict(...)
    result = train(
        config,                      # TrainConfig
        train_items,                 # list[(image_path, label)]; labels any ints (remapped to 0..C-1 inside)
        val_items,                   # list[(image_path, label)] held out (other images or other classes); may be []
        out_dir,                     # Path; resumes automatically from out_dir/resume.pt when present
        load_image,                  # path -> upright RGB PIL image: the service's decoder (models/data.py)
        init_checkpoint=None,        # a checkpoint dir to fine-tune (its EmbedderConfig replaces config.embedder)
        device="auto",               # "auto" | "cpu" | "cuda" | "cuda:1" | torch.device
        progress=None,               # Callable[[dict], None]: every log record (train steps and validations)
        should_stop=None,            # Callable[[], bool]: polled each step; True saves a resume state and returns
    )
    result.best_checkpoint_dir       # out_dir/"best": the checkpoint with the best validation MAP@R
    result.metrics                   # that checkpoint's validation metrics (recall@K, map@r, r_precision)

What it does: AdamW (the embedder's `parameter_groups()`: backbone at `lr`, new heads at `head_lr`; loss
parameters such as proxies at `loss_lr`), linear warm-up then cosine decay, bf16 autocast on CUDA when `amp`,
gradient clipping, class-balanced batches (`m_per_class` images per class, PML's MPerClassSampler), validation
every `eval_every` steps (default: once per epoch), best checkpoint by validation MAP@R (never a test split), a
resume state every `checkpoint_every` steps (atomically replaced; a killed run restarts from the last one), a
JSON-lines log (out_dir/log.jsonl), a tqdm bar. Seeded: the batches of each epoch are a pure function of (seed,
epoch, rank). The optimisation pieces (param groups, schedule, frozen parameters) are in models/optim.py.

DDP: under `torchrun --nproc_per_node N -m app.cli train ...`, each process takes batch_size / N images per step;
gradients (including loss parameters) are all-reduced; the losses and the cross-batch memory see the global batch
(all ranks' embeddings, models/distributed.py), so N processes step like one on the whole batch; rank 0 validates
and writes files; `should_stop` returning True on any rank stops every rank.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from models.checkpoint import load_checkpoint, read_config, save_checkpoint
from models.config import TrainConfig
from models.data import Item, ItemsDataset, LoadImage, dataset_splits, m_per_class_batches, train_transform
from models.distributed import gather_keeping_local_grad, scale_loss_parameter_grads
from models.embedder import Embedder, resolve_device
from models.evaluate import evaluate_items
from models.graded import evaluate_graded_items, graded_batches, graded_splits, is_graded
from models.irt import fit_pca_on_items, has_pca
from models.losses import RetrievalLoss, build_loss
from models.optim import freeze_parameters, lr_schedule, optimizer_groups, set_train_mode
from models.zoo import create_embedder

RESUME_FILE = "resume.pt"
LOG_FILE = "log.jsonl"


@dataclass
class TrainResult:
    best_checkpoint_dir: Path
    last_checkpoint_dir: Path | None
    metrics: dict[str, float]
    step: int
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainingModel(nn.Module):
    """Embedder + loss in one module, so DDP all-reduces the loss's own parameters (proxies) too."""

    def __init__(self, embedder: Embedder, loss: RetrievalLoss, amp: bool) -> None:
        super().__init__()
        self.embedder = embedder
        self.loss = loss
        self.amp = amp

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp and pixels.is_cuda):
            embedding, parts = self.embedder.forward_train(pixels)
            embedding = embedding.float()
            # Under DDP the losses (and the cross-batch memory) see the global batch (models/distributed.py).
            embedding, labels = gather_keeping_local_grad(embedding), gather_keeping_local_grad(labels)
            parts = gather_keeping_local_grad(parts) if parts is not None else None
            total, terms = self.loss(embedding, labels, parts)
            extra = self.embedder.extra_losses(embedding, parts)
        if extra:
            total = total + sum(extra.values())
            terms.update({name: float(value.detach()) for name, value in extra.items()})
        return total, terms


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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """One training run: built (and resumed) in __init__, trained by `run()`; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        train_items: Sequence[Item],
        val_items: Sequence[Item],
        out_dir: str | Path,
        load_image: LoadImage,
        init_checkpoint: str | Path | None = None,
        device: torch.device | str = "auto",
        progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.config, self.val_items, self.load_image = config, list(val_items), load_image
        self.out_dir = Path(out_dir)
        self.progress, self.should_stop = progress, should_stop
        self.rank, self.world, self.device = _distributed(device)
        self.is_main = self.rank == 0
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(config.seed + self.rank)

        resume_path = self.out_dir / RESUME_FILE
        if init_checkpoint is not None:
            self.embedder_config = read_config(init_checkpoint)
            self.embedder = load_checkpoint(init_checkpoint).train()
        else:
            self.embedder_config = config.embedder_config()
            self.embedder = create_embedder(self.embedder_config)
            if has_pca(self.embedder) and not resume_path.is_file():
                # A fresh PCA head: fitted once, then carried by the weights.
                fit_pca_on_items(self.embedder, train_items, load_image)
        # Graded labels (log-ratio loss) are numbers whose distances matter: kept as they are, batches built by
        # label-space neighbourhood, checkpoints chosen by Spearman. Class labels are remapped to 0..C-1.
        self.graded = is_graded(config.loss)
        self.selection_metric = "spearman" if self.graded else "map@r"
        if self.graded:
            num_classes = 0
            self.train_items = [(path, float(label)) for path, label in train_items]
        else:
            classes = sorted({label for _, label in train_items})
            remap = {label: i for i, label in enumerate(classes)}
            self.train_items = [(path, remap[label]) for path, label in train_items]
            num_classes = len(classes)
        self.loss = build_loss(config.loss, self.embedder.dim, num_classes, self.embedder.num_parts)
        freeze_parameters(self.embedder, config.freeze)
        self.model = TrainingModel(self.embedder, self.loss, config.amp).to(self.device)
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.embedder, self.loss, config), weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(config))

        self.step, self.best_metric, self.best_metrics = 0, float("-inf"), {}
        self.history: list[dict[str, Any]] = []
        self.validated = False  # on every rank (best_metric is only known on rank 0)
        self.steps_per_epoch = max(1, len(self.train_items) // config.batch_size)
        if resume_path.is_file():
            self._load_resume(resume_path)

    # -- state ---------------------------------------------------------------------------------------------

    def _load_resume(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss.load_memory_state(state["loss_memory"])
        self.step, self.best_metric, self.best_metrics = state["step"], state["best_metric"], state["best_metrics"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])

    def _save_resume(self) -> None:
        if not self.is_main:
            return
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss_memory": self.loss.memory_state(),
            "best_metric": self.best_metric,
            "best_metrics": self.best_metrics,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "config": self.config.to_dict(),
        }
        _atomic_torch_save(state, self.out_dir / RESUME_FILE)

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.is_main:
            with (self.out_dir / LOG_FILE).open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.progress is not None:
                self.progress(entry)

    # -- the loop ------------------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        """The remaining batches, epoch by epoch, regenerated identically on resume."""
        config, labels = self.config, [label for _, label in self.train_items]
        per_rank = config.batch_size // self.world
        first_epoch, skip = divmod(self.step, self.steps_per_epoch)
        batches: list[list[int]] = []
        for epoch in range(first_epoch, math.ceil(config.steps / self.steps_per_epoch)):
            seed = config.seed * 100_003 + epoch * self.world + self.rank
            if self.graded:
                neighbors = int(config.loss.get("neighbors", 5))
                epoch_batches = graded_batches(labels, per_rank, neighbors, self.steps_per_epoch, seed)
            else:
                epoch_batches = m_per_class_batches(labels, config.m_per_class, per_rank, self.steps_per_epoch, seed)
            batches.extend(epoch_batches[skip:] if epoch == first_epoch else epoch_batches)
        return DataLoader(
            ItemsDataset(self.train_items, train_transform(self.embedder_config), self.load_image),
            batch_sampler=batches[: max(0, config.steps - self.step)],
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _validate(self) -> None:
        self.validated = True
        if self.is_main:
            if self.val_items:
                evaluate = evaluate_graded_items if self.graded else evaluate_items
                ks = {} if self.graded else {"ks": self.config.ks}
                metrics = evaluate(
                    self.embedder,
                    self.val_items,
                    self.load_image,
                    **ks,
                    batch_size=self.config.eval_batch_size,
                    num_workers=self.config.num_workers,
                    device=self.device,
                    amp=self.config.amp,
                )
            else:
                metrics = {self.selection_metric: float(self.step)}  # no validation split: the latest is the best
            self._record({"event": "val", "step": self.step, "epoch": self.step / self.steps_per_epoch, **metrics})
            if metrics[self.selection_metric] > self.best_metric:
                self.best_metric, self.best_metrics = metrics[self.selection_metric], metrics
                save_checkpoint(self.embedder, self.out_dir / "best", extra={"step": self.step, "val": metrics})
        if self.world > 1:
            dist.barrier()
        set_train_mode(self.model, self.embedder, self.config.freeze_bn)  # evaluation left everything in train mode

    def run(self) -> TrainResult:
        config, device = self.config, self.device
        loader = self._loader()
        train_module: nn.Module = self.model
        if self.world > 1:
            train_module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        eval_every = config.eval_every or self.steps_per_epoch
        stopped = False
        bar = None
        if self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True, disable=None)
        set_train_mode(self.model, self.embedder, config.freeze_bn)
        if self.step == 0 and config.eval_at_start and config.steps > 0:
            self._validate()
        started = time.time()
        for pixels, batch_labels in loader:
            if _any_rank(self.should_stop is not None and self.should_stop(), self.world, device):
                stopped = True
                break
            pixels = pixels.to(device, non_blocking=True)
            batch_labels = batch_labels.to(device, non_blocking=True)
            total, terms = train_module(pixels, batch_labels)
            self.optimizer.zero_grad(set_to_none=True)
            (total * self.world).backward()  # every rank's loss is the global one; DDP averages over ranks
            scale_loss_parameter_grads(self.loss, self.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total.item():.4f}")
            if self.step % config.log_every == 0 or self.step == config.steps:
                self._record(
                    {
                        "event": "train",
                        "step": self.step,
                        "loss": total.item(),
                        **terms,
                        "grad_norm": float(grad_norm),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "seconds": round(time.time() - started, 2),
                    }
                )
            if self.step % eval_every == 0 or self.step == config.steps:
                self._validate()
            if self.step % config.checkpoint_every == 0:
                self._save_resume()
        if bar is not None:
            bar.close()
        if not self.validated and not stopped and not (self.out_dir / "best").is_dir():
            self._validate()  # resumed after the end, or zero steps: make sure a best checkpoint exists
        self._save_resume()
        last_dir = None
        if self.is_main and not stopped:
            last_dir = save_checkpoint(self.embedder, self.out_dir / "last", extra={"step": self.step})
        if self.world > 1:
            dist.barrier()
        return TrainResult(self.out_dir / "best", last_dir, self.best_metrics, self.step, stopped, self.history)


def train(
    config: TrainConfig,
    train_items: Sequence[Item],
    val_items: Sequence[Item],
    out_dir: str | Path,
    load_image: LoadImage,
    init_checkpoint: str | Path | None = None,
    device: torch.device | str = "auto",
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train (or resume training) an embedder; see the module docstring."""
    trainer = Trainer(
        config, train_items, val_items, out_dir, load_image, init_checkpoint, device, progress, should_stop
    )
    return trainer.run()


def run_config(
    config: TrainConfig,
    out_dir: str | Path,
    load_image: LoadImage,
    device: str = "auto",
    init_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Train from a config's data section, then evaluate the best checkpoint on the test classes."""
    graded = bool(config.data.get("graded"))
    train_items, val_items, test_items = (graded_splits if graded else dataset_splits)(config.data)
    result = train(config, train_items, val_items, out_dir, load_image, init_checkpoint, device)
    summary: dict[str, Any] = {
        "step": result.step,
        "val": result.metrics,
        "best_checkpoint": str(result.best_checkpoint_dir),
    }
    if test_items and int(os.environ.get("RANK", "0")) == 0:
        dev = resolve_device(device) if isinstance(device, str) else device
        best = load_checkpoint(result.best_checkpoint_dir, dev)
        evaluate = evaluate_graded_items if graded else evaluate_items
        summary["test"] = evaluate(
            best,
            test_items,
            load_image,
            **({} if graded else {"ks": config.ks}),
            batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
            device=dev,
            amp=config.amp,
        )
        summary["num_test"] = len(test_items)
        (Path(out_dir) / "test_metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = ["RESUME_FILE", "TrainResult", "Trainer", "TrainingModel", "run_config", "train"]
