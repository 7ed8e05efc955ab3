"""The service's choice of inference runtime (models/runtime.py) for a model version, and the probe images it is
checked on.

One function, `load_runner`, is used by everything that embeds for the index: the service at load and hot swap,
the batch build and the worker's re-embed. So stored vectors and query vectors come from the same runtime and
precision, and a model version's export is made by whichever of them loads it first (the build, after a worker
promotes it; or the service) and reused by the rest.
"""

from __future__ import annotations

import logging
import time
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

PROBE_IMAGES = 8
# A forward pass cheaper than this per image (all its threads, batch 4) leaves the API's runtime one thread short.
CHEAP_FORWARD_MS = 5.0


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


def forward_ms_per_image(runner: Runner, probe: torch.Tensor) -> float:
    """The runner's best of 3 timed passes over 4 probe images, in ms per image (after one warm-up pass)."""
    batch = probe[:4].cpu()
    runner.run(batch)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        runner.run(batch)
        best = min(best, time.perf_counter() - started)
    return best * 1000 / len(batch)


def load_runner(settings: Settings, checkpoint_dir: str | Path, serving: bool = False) -> Runner:
    """The checkpoint's embedder on the configured device and runtime (RETRIEVAL_RUNTIME), checked for parity.

    `serving` (the API): with RETRIEVAL_INFERENCE_THREADS=0 and OpenVINO (the CPU default) whose forward pass is
    cheap (under CHEAP_FORWARD_MS per image on all its threads), the runtime gets one thread less, a core left for
    the request handling that runs beside it. Given every core, its thread pool spins against the request threads:
    Lite0 (2.6 ms) served 8-17% more queries/s on 2 cores with 1 thread than with 2. A costly forward pass is worth
    every core: the three-trunk default (~10 ms) served 56 q/s with 1 thread against 69-76 with 2
    (docs/benchmarks.md). The timing is taken at each load, so a version hot-swapped in while the server is busy
    may measure slow and keep every thread."""
    from models.checkpoint import load_checkpoint
    from models.embedder import resolve_device
    from models.export import export_dir
    from models.runtime import reference_embeddings, select_runner

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
    probe = probe_batch(settings, embedder.config)
    may_rebuild = (serving and settings.inference_threads == 0 and device.type == "cpu"
                   and settings.runtime in ("auto", "openvino"))
    # The parity check's torch reference, computed once when the runtime may be built twice (below).
    reference = reference_embeddings(embedder, probe) if may_rebuild else None
    runner = select_runner(embedder, device, probe, exports, requested=settings.runtime,
                           precision=settings.inference_precision, threads=settings.inference_threads,
                           reference=reference)
    if not (may_rebuild and runner.info.runtime == "openvino"):
        return runner
    # OpenVINO's own count (physical cores; on a hyper-threaded host fewer than the logical CPUs).
    threads = int(runner.compiled.get_property("INFERENCE_NUM_THREADS"))
    if threads < 2:
        return runner
    per_image = forward_ms_per_image(runner, probe)
    if per_image >= CHEAP_FORWARD_MS:
        log.info("inference runtime keeps all %d threads: %.1f ms per image", threads, per_image)
        return runner
    log.info("inference runtime gets %d of %d threads (%.1f ms per image: a core is left for request handling)",
             threads - 1, threads, per_image)
    return select_runner(embedder, device, probe, exports, requested=settings.runtime,
                         precision=settings.inference_precision, threads=threads - 1, reference=reference)
