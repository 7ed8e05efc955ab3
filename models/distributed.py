"""The global batch under DDP: every rank sees all ranks' embeddings, its own still carrying their gradients.

The contrastive loss and the cross-batch memory (IRT's recipe) need the global batch: positives and negatives
from every rank, and one memory that enqueues what every rank embedded. `gather_keeping_local_grad` concatenates
each rank's tensor in rank order (so the global batch is the one a single process would see) and puts the local
tensor, with its autograd graph, in this rank's slot. Every rank then computes the same loss L on the global
batch, and backprop gives dL/d(local embeddings) exactly; scaling L by the world size before backward undoes
DDP's gradient averaging, so the parameter gradients are those of one process on the whole global batch.
No collective runs during backward (unlike an autograd all_gather), so it also works on gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_keeping_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' `tensor` concatenated along dim 0 in rank order; this rank's slice keeps its gradient.
    Every rank must pass the same shape (DDP batches are equal-sized per rank)."""
    if world_size() <= 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


def scale_loss_parameter_grads(loss: torch.nn.Module, world: int) -> None:
    """After `(loss * world).backward()` and DDP's averaging: the loss's own parameters (proxies) got dL/dp on
    every rank, not a per-rank share, so they come out `world` times too large; scale them back."""
    if world > 1:
        for parameter in loss.parameters():
            if parameter.grad is not None:
                parameter.grad.div_(world)
