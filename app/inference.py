"""The service's choice of inference runtime (models/runtime.py) for a model version, and the probe images it is
checked on.

One function, `load_runner`, is used by everything that embeds for the index: the service at load and hot swap,
the batch build and the worker's re-embed. So stored vectors and query vectors come from the same runtime and
precision, and a model version's export is made by whichever of them loads it first (the build, after a worker
promotes it; or the service) and reused by the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from app.db.models import Image
from app.db.session import session_scope
from app.images import ImageError, read_image_file
from app.settings import Settings

if TYPE_CHECKING:  # torch loads lazily: the CLI's SQL-only commands start fast
    import torch

    from models.embedder import EmbedderConfig
    from models.runtime import Runner

log = logging.getLogger(__name__)


def serving_threads(workers: int) -> int:
    """The inference runtime's threads in each of `workers` API processes when RETRIEVAL_INFERENCE_THREADS is 0:
    the process's share of the cores less one, for the request handling (HTTP, decoding, the SQL join) that runs
    beside the forward pass; at least 1. A runtime given every core spins its thread pool against the request
    threads: on 2 cores, 1 thread served 8-17% more queries/s with 18% less CPU per query (docs/benchmarks.md).
    Builds and the worker, which do nothing else while they embed, keep every core."""
    from models.runtime import default_threads

    return max(1, default_threads() // max(1, workers) - 1)

PROBE_IMAGES = 8


def probe_batch(settings: Settings, config: EmbedderConfig, count: int = PROBE_IMAGES) -> torch.Tensor:
    """Up to `count` stored images, decoded and preprocessed as queries are: what a runtime's parity is checked
    on. An empty (or unreadable) corpus gets synthetic images instead, said in the log."""
    import torch

    from models.embedder import eval_transform
    from models.runtime import synthetic_probe

    with session_scope(settings.resolved_database_url) as session:
        uris = list(session.scalars(select(Image.uri).where(Image.deleted_at.is_(None)).order_by(Image.id)
                                    .limit(count * 2)))
    transform = eval_transform(config)
    tensors = []
    for uri in uris:
        try:
            tensors.append(transform(read_image_file(uri, settings.max_upload_bytes, settings.max_image_pixels,
                                                     min_side=config.resize_size)))
        except (ImageError, OSError):
            continue
        if len(tensors) == count:
            break
    if len(tensors) < 2:
        log.info("fewer than 2 stored images to check the inference runtime on: adding synthetic ones")
        return torch.cat([torch.stack(tensors), synthetic_probe(config, 4)]) if tensors else synthetic_probe(config, 4)
    return torch.stack(tensors)


def load_runner(settings: Settings, checkpoint_dir: str | Path) -> Runner:
    """The checkpoint's embedder on the configured device and runtime (RETRIEVAL_RUNTIME), checked for parity."""
    from models.checkpoint import load_checkpoint
    from models.embedder import resolve_device
    from models.export import export_dir
    from models.runtime import select_runner

    device = resolve_device(settings.device)
    if settings.inference_threads > 0:  # torch's share too (preprocessing, the torch runtime, heatmaps)
        import torch

        torch.set_num_threads(settings.inference_threads)
    embedder = load_checkpoint(checkpoint_dir, device=device)
    try:
        exports: Path | None = export_dir(checkpoint_dir)
    except OSError as exc:
        log.warning("cannot read checkpoint %s to key its export (%s): serving with torch", checkpoint_dir, exc)
        exports = None
    return select_runner(embedder, device, probe_batch(settings, embedder.config), exports,
                         requested=settings.runtime, precision=settings.inference_precision,
                         threads=settings.inference_threads)
