"""DDP with the global batch: 2 gloo processes, each with half of a batch, give the loss and the gradients of one
process on the whole batch, step after step (so the cross-batch memory holds the same global batches too), for the
IRT recipe (contrastive + cross-batch memory + KoLeo) and for a loss with its own parameters (proxies)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.postgres import free_port

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 3
LOSSES = ({"name": "contrastive_xbm", "memory_size": 40, "koleo": 0.7}, {"name": "proxy_anchor"})


def _model(loss: dict):
    from models.embedder import EmbedderConfig
    from models.losses import build_loss
    from models.train import TrainingModel
    from models.zoo import create_embedder

    torch.manual_seed(0)
    embedder = create_embedder(EmbedderConfig(arch="timm", backbone="resnet10t", dim=16, image_size=32,
                                              resize_size=32, pretrained="none"))
    embedder.eval()  # batch norm on running statistics: per-rank batch statistics are a different model
    return TrainingModel(embedder, build_loss(loss, 16, num_classes=4), amp=False)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(2).repeat(2)  # each rank's half holds 2 images of each class
    return [(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator), labels) for _ in range(STEPS)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, out: str) -> None:
    from models.distributed import scale_loss_parameter_grads

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    half = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    results = []
    for loss in LOSSES:
        model = _model(loss)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        steps = []
        for pixels, labels in _batches():
            model.zero_grad(set_to_none=True)
            total, _ = ddp(pixels[half], labels[half])
            (total * WORLD).backward()  # as models/train.py does
            scale_loss_parameter_grads(model.loss, WORLD)
            steps.append((total.item(), _grads(model)))
        results.append(steps)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_equals_one_process_on_the_doubled_batch(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for which, loss in enumerate(LOSSES):
        model = _model(loss)
        for step, (pixels, labels) in enumerate(_batches()):
            model.zero_grad(set_to_none=True)
            total, _ = model(pixels, labels)
            total.backward()
            expected = _grads(model)
            for rank in ranks:
                ddp_loss, ddp_grads = rank[which][step]
                assert abs(ddp_loss - total.item()) < 1e-5 * max(1.0, abs(total.item())), (loss, step)
                assert ddp_grads.keys() == expected.keys()
                for name, grad in expected.items():
                    where = f"{loss['name']} step {step} {name}"
                    torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-3, atol=1e-5,
                                               msg=lambda m, where=where: f"{where}: {m}")
