"""Step 2, embed: every live image (or a given slice) with no stored embedding for a model is decoded by
app.images and embedded in batches (on CPU a batch is decoded on every core, then embedded on every core; on a GPU,
DataLoader processes decode ahead of the forward pass). Embeddings are appended to
<data_dir>/embeddings/<model version>/ as float16 shards, flushed every few thousand images. A file that fails to
decode is reported and its row soft-deleted with the reason in metadata["decode_error"]."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session

from app.db.models import Image, ModelVersion
from app.db.queries import image_uris, live_image_ids
from app.db.session import session_scope
from app.images import ImageError, read_image_file
from app.indexing.report import BuildReport
from app.settings import Settings
from index import versions

if TYPE_CHECKING:  # torch loads lazily: the CLI's SQL-only commands start fast
    from models.runtime import Runner


class _DecodeDataset:
    """Map-style dataset over (id, uri) arrays; returns (id, uint8 crop or None, failure reason, uri)."""

    def __init__(self, ids: np.ndarray, uris: np.ndarray, crop: Callable[[Any], Any], max_bytes: int,
                 max_pixels: int, min_side: int) -> None:
        # numpy arrays, not Python lists: forked workers then share the pages instead of copying them.
        self.ids, self.uris, self.crop = ids, uris, crop
        self.max_bytes, self.max_pixels, self.min_side = max_bytes, max_pixels, min_side

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, Any, str, str]:
        uri = self.uris[i].decode("utf-8")
        pixels, reason = decode_for_embedding(uri, self.crop, self.max_bytes, self.max_pixels, self.min_side)
        return int(self.ids[i]), pixels, reason, uri


def decode_for_embedding(uri: str, crop: Callable[[Any], Any], max_bytes: int, max_pixels: int,
                         min_side: int) -> tuple[Any, str]:
    """(uint8 crop, "") or (None, why the file does not decode): the one decoder, then the first half of the
    model's eval transform (`EvalTransform.crop`; the batch is normalised where it is embedded). Shared by the
    build here and the Ray decode tasks (app/indexing/ray_build.py)."""
    try:
        image = read_image_file(uri, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side)
        return crop(image), ""
    except ImageError as exc:
        return None, exc.message
    except OSError as exc:
        return None, f"cannot read the file: {exc}"


def _collate(items: list[tuple[int, Any, str, str]]) -> tuple[np.ndarray, Any, list[tuple[int, str, str]]]:
    import torch

    ok = [(i, t) for i, t, _, _ in items if t is not None]
    failed = [(i, uri, reason) for i, t, reason, uri in items if t is None]
    ids = np.asarray([i for i, _ in ok], dtype=np.int64)
    batch = torch.stack([t for _, t in ok]) if ok else None
    return ids, batch, failed


def decode_workers(num_workers: int, on_gpu: bool) -> int:
    """How many workers decode for a build (RETRIEVAL_NUM_WORKERS at least): on a GPU one process per core but one,
    on CPU one thread per core; 0 stays 0 (the calling thread decodes)."""
    from models.runtime import default_threads

    if num_workers == 0:
        return 0
    return max(num_workers, default_threads() - 1 if on_gpu else default_threads())


def _decoded_batches(dataset: _DecodeDataset, batch_size: int, num_workers: int,
                     on_gpu: bool) -> Iterator[tuple[np.ndarray, Any, list[tuple[int, str, str]]]]:
    """(ids, uint8 batch or None, failures) per batch of `dataset`, in order.

    On a GPU, DataLoader processes (`num_workers`, at least one per core but one: the GPU embeds faster than a
    few cores decode) decode the next batches while the device runs this one. On CPU the two take turns: a batch
    is decoded by a thread per core (`num_workers` at least), then the forward pass gets every core. Decoding
    beside the forward pass (the DataLoader's way) preempted the runtime's threads mid-layer and left the others
    waiting at its barriers: Lite0 built cub100 at 0.68x of its model-only img/s that way (docs/benchmarks.md).
    `num_workers=0` decodes on the calling thread (the service's catch-up, which must not take every core)."""
    workers = decode_workers(num_workers, on_gpu)
    if on_gpu and workers > 0:
        import torch

        yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                               collate_fn=_collate, pin_memory=True)
        return
    batches = (range(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size))
    if workers == 0:
        for rows in batches:
            yield _collate([dataset[i] for i in rows])
        return
    # Pillow's decoder and torch's resize release the GIL, so threads decode in parallel without pickling.
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        for rows in batches:
            yield _collate(list(pool.map(dataset.__getitem__, rows)))


def file_uris(session: Session, ids: np.ndarray) -> np.ndarray:
    # A bytes array, not a dict: DataLoader workers share it without copying Python objects.
    found = image_uris(session, ids)
    return np.array([found[int(i)].encode("utf-8") for i in ids], dtype=np.bytes_)


def run_tag(stem_prefix: str) -> str:
    """A unique stem prefix for one process's embedding shards (time + pid: concurrent writers never collide)."""
    return f"{stem_prefix}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}"


def missing_embeddings(settings: Settings, model: ModelVersion, candidates: np.ndarray | None) -> np.ndarray:
    """Live images (all, or `candidates`) with no committed embedding shard for `model`: what a run still owes."""
    with session_scope(settings.resolved_database_url) as session:
        live = live_image_ids(session)
    todo = live if candidates is None else np.intersect1d(candidates, live)
    return np.setdiff1d(todo, versions.embedded_ids(settings.embeddings_dir(model.name)))


def embed_missing(settings: Settings, model: ModelVersion, candidates: np.ndarray | None, report: BuildReport,
                  progress: bool, stem_prefix: str = "run") -> None:
    """Embed live images (all, or `candidates`) that have no stored embedding for `model`."""
    from app.inference import load_runner

    store = settings.embeddings_dir(model.name)
    todo = missing_embeddings(settings, model, candidates)
    if len(todo) == 0:
        return
    # The service's own runtime and precision: stored vectors and query vectors come from the same arithmetic.
    runner = load_runner(settings, model.path)
    embed_into_store(settings, runner, store, todo, report, progress, stem_prefix, settings.num_workers)


def embed_into_store(settings: Settings, runner: Runner, store: Path, ids: np.ndarray, report: BuildReport,
                     progress: bool, stem_prefix: str, num_workers: int,
                     on_stored: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
    """Embed images `ids` from their files into embedding shards under `store`, flushed every
    `embed_flush_every` images (so a kill loses at most that much). A file that does not decode soft-deletes
    its row with the reason (BuildReport.failed). `on_stored(ids, vectors)` sees each shard once it is on disk.
    Used by index builds and by the service's catch-up at load."""
    from tqdm import tqdm

    from models.embedder import eval_transform
    from models.runtime import TorchRunner

    url = settings.resolved_database_url
    with session_scope(url) as session:
        uris = file_uris(session, ids)
    config = runner.config
    transform = eval_transform(config)
    dataset = _DecodeDataset(ids, uris, transform.crop, settings.max_upload_bytes, settings.max_image_pixels,
                             min_side=config.resize_size)
    on_gpu = runner.info.on_gpu  # ONNX Runtime asked for CUDA without its CUDA provider takes turns like CPU
    # The torch runner takes device tensors: its uint8 batch crosses to the GPU, a quarter of the float bytes,
    # and is normalised there.
    to_device = runner.device if on_gpu and isinstance(runner, TorchRunner) else None
    buf_ids: list[np.ndarray] = []
    buf_vecs: list[np.ndarray] = []
    tag = run_tag(stem_prefix)
    shard_no = 0

    def flush() -> None:
        nonlocal shard_no
        if buf_ids:
            shard_ids, shard_vecs = np.concatenate(buf_ids), np.concatenate(buf_vecs)
            versions.write_embedding_shard(store, f"{tag}-{shard_no:05d}", shard_ids, shard_vecs)
            if on_stored is not None:
                on_stored(shard_ids, shard_vecs)
            shard_no += 1
            buf_ids.clear()
            buf_vecs.clear()

    start = time.perf_counter()
    bar = tqdm(total=len(ids), desc="embed", unit="img", disable=not progress, dynamic_ncols=True)
    pending_failures: list[tuple[int, str, str]] = []
    # closing(): a runner or flush that raises must not leave the decode threads (or processes) waiting.
    with contextlib.closing(_decoded_batches(dataset, settings.batch_size, num_workers, on_gpu)) as batches:
        for batch_ids, batch, failed in batches:
            if batch is not None:
                if to_device is not None:
                    batch = batch.to(to_device, non_blocking=True)
                vectors = runner.run(transform.normalize(batch))
                buf_ids.append(batch_ids)
                buf_vecs.append(vectors)
                report.embedded += len(batch_ids)
            pending_failures.extend(failed)
            bar.update(len(batch_ids) + len(failed))
            if sum(len(b) for b in buf_ids) >= settings.embed_flush_every:
                flush()
                mark_failed(url, pending_failures, report)
    flush()
    mark_failed(url, pending_failures, report)
    bar.close()
    elapsed = time.perf_counter() - start
    report.images_per_second = report.embedded / elapsed if elapsed > 0 else 0.0
    if progress:
        print(f"embedded {report.embedded} images in {elapsed:.1f}s: {report.images_per_second:.1f} images/s")


def mark_failed(url: str, failures: list[tuple[int, str, str]], report: BuildReport) -> None:
    """Soft-delete rows whose file does not decode, keeping the reason; they are reported on every run."""
    if not failures:
        return
    now = datetime.now(UTC)
    with session_scope(url) as session:
        for image_id, uri, reason in failures:
            image = session.get(Image, image_id)
            if image is not None:
                image.meta = {**(image.meta or {}), "decode_error": reason}
                image.deleted_at = now
            report.failed.append((uri, reason))
    failures.clear()

