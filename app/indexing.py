"""The batch index-building job: source -> SQL rows -> DataLoader decode -> embed -> embedding shards -> index.

Three steps, each resumable after `kill -9` at any moment because each one derives its work from durable state:

1. register: stream the source (a folder, or a CSV manifest read row by row), hash each file (sha256 of its
   bytes), read its header, and insert rows that are not there yet, committed in chunks. Dedup is by sha256,
   so a re-run inserts nothing twice.
2. embed: every live image of the store (or of this shard's slice) with no stored embedding for the active
   model is decoded by app.images in DataLoader workers and embedded in batches. Embeddings are appended to
   <data_dir>/embeddings/<model version>/ as float16 shards, flushed every few thousand images. A file that
   fails to decode is reported and its row soft-deleted with the reason in metadata["decode_error"].
3. publish (not in shard mode): all stored embeddings of live images -> a FAISS index (type picked from the
   corpus size unless a factory is given, search params tuned to a recall target) written under a temporary
   name, renamed into <indexes_dir>/<version>, and only then inserted in SQL and promoted. If the active index
   already holds exactly the live images, nothing is published.

Sharded runs (`shard=(i, n)`) take rows i, i+n, i+2n... of the source, register and embed them, and stop;
`merge_shards` then embeds whatever is still missing and publishes one index (FAISS's on-disk IVF merge for
IVF types when asked).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Image, IndexVersion, ModelVersion
from app.db.queries import image_uris, live_image_ids
from app.db.session import session_scope
from app.images import ImageError, read_image_file
from app.registry import active_index, ensure_model_version, new_version_name, promote
from app.settings import Settings
from index import versions
from index.vector_index import VectorIndex, build, choose_factory, merge_ivf_ondisk

if TYPE_CHECKING:  # torch loads lazily: the CLI's SQL-only commands start fast
    from models.embedder import Embedder

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
REGISTER_CHUNK = 512


@dataclass
class BuildReport:
    """What a run did. added: rows registered by this run (a file that then fails to decode is counted here and
    in `failed`); skipped_existing: files whose bytes were already registered; failed: (path, reason);
    embedded: images embedded by this run; total_indexed: vectors in the active index afterwards;
    index_version_name: the version published, None when nothing changed or in shard mode."""

    added: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0
    total_indexed: int = 0
    images_per_second: float = 0.0
    index_version_name: str | None = None
    seconds: float = 0.0
    shard: tuple[int, int] | None = None
    factory: str | None = None
    message: str = ""

    def summary(self) -> str:
        lines = [
            f"added {self.added} new images, {self.skipped_existing} already registered, "
            f"{len(self.failed)} failed, embedded {self.embedded} "
            f"({self.images_per_second:.1f} images/s), {self.seconds:.1f}s",
            self.message,
        ]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        return "\n".join(line for line in lines if line)


@dataclass
class SourceEntry:
    path: Path
    label: str | None
    meta: dict[str, Any]


def iter_source(source: str | Path, shard: tuple[int, int] | None = None) -> Iterator[SourceEntry]:
    """Stream entries from a folder (labels = sub-folder names) or a CSV manifest (path,label,extra...)."""
    source = Path(source)
    entries = _iter_csv(source) if source.is_file() else _iter_folder(source)
    for row_number, entry in enumerate(entries):
        if shard is None or row_number % shard[1] == shard[0]:
            yield entry


def _iter_folder(root: Path) -> Iterator[SourceEntry]:
    if not root.is_dir():
        raise FileNotFoundError(f"source {root} is neither a folder nor a CSV manifest")
    root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # a stable order, so `--shard i/n` slices agree across machines
        rel = Path(dirpath).relative_to(root)
        label = None if rel == Path(".") else rel.as_posix()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                yield SourceEntry(Path(dirpath) / name, label, {})


def _iter_csv(manifest: Path) -> Iterator[SourceEntry]:
    base = manifest.resolve().parent
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)  # reads one row at a time: manifests of millions of rows are fine
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{manifest}: a manifest needs a 'path' column, got {reader.fieldnames}")
        for row in reader:
            raw = (row.pop("path") or "").strip()
            if not raw:
                continue
            path = Path(raw)
            label = (row.pop("label", None) or "").strip() or None
            meta = {k: v for k, v in row.items() if k and v not in (None, "")}
            yield SourceEntry(path if path.is_absolute() else (base / path).resolve(), label, meta)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _Probe:
    entry: SourceEntry
    sha256: str | None = None
    width: int = 0
    height: int = 0
    error: str | None = None


def _probe(entry: SourceEntry, max_bytes: int, max_pixels: int) -> _Probe:
    """Hash the file and read its header (dimensions only: the full decode happens in the DataLoader)."""
    from PIL import Image as PILImage

    try:
        size = entry.path.stat().st_size
        if size == 0:
            return _Probe(entry, error="the file is empty")
        if size > max_bytes:
            return _Probe(entry, error=f"the file is {size} bytes; the limit is {max_bytes} bytes")
        data = entry.path.read_bytes()
    except OSError as exc:
        return _Probe(entry, error=f"cannot read the file: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - Pillow raises many types on junk headers
        return _Probe(entry, error="the file is not an image in a format this service reads")
    if width * height > max_pixels:
        return _Probe(entry, error=f"the image is {width}x{height} pixels; the limit is {max_pixels}")
    return _Probe(entry, digest, width, height)


def _memory_budget(settings: Settings) -> int:
    return settings.index_memory_mb << 20


def _recall_target(settings: Settings) -> float:
    return settings.index_recall_target


# -- step 1: register ---------------------------------------------------------------------------------

def _register_chunk(session: Session, probes: list[_Probe], report: BuildReport) -> list[int]:
    """Insert rows for new hashes; returns the ids of every image of this chunk (new or existing)."""
    good = [p for p in probes if p.sha256 is not None]
    shas = sorted({p.sha256 for p in good if p.sha256})
    existing = {
        row.sha256: row
        for row in session.execute(
            select(Image.sha256, Image.id, Image.deleted_at, Image.meta).where(Image.sha256.in_(shas))
        )
    }
    ids: list[int] = []
    new: dict[str, Image] = {}
    for probe in good:
        assert probe.sha256 is not None
        row = existing.get(probe.sha256)
        if row is not None:
            error = (row.meta or {}).get("decode_error") if row.deleted_at is not None else None
            if error:
                report.failed.append((str(probe.entry.path), error))
            else:
                report.skipped_existing += 1
                if row.deleted_at is None:
                    ids.append(row.id)
        elif probe.sha256 in new:
            report.skipped_existing += 1  # the same bytes twice in one source
        else:
            new[probe.sha256] = Image(sha256=probe.sha256, uri=str(probe.entry.path.resolve()),
                                      label=probe.entry.label, width=probe.width, height=probe.height,
                                      meta=dict(probe.entry.meta))
    session.add_all(new.values())
    session.flush()
    report.added += len(new)
    ids.extend(image.id for image in new.values())
    return ids


def register_source(settings: Settings, source: str | Path, shard: tuple[int, int] | None,
                    report: BuildReport, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    url = settings.resolved_database_url
    all_ids: list[np.ndarray] = []
    bar = tqdm(desc="register", unit="file", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(2, settings.num_workers * 2)) as pool:  # hashing is I/O bound
        for chunk in _chunks(iter_source(source, shard), REGISTER_CHUNK):
            probes = list(pool.map(lambda e: _probe(e, settings.max_upload_bytes, settings.max_image_pixels),
                                   chunk))
            report.failed.extend((str(p.entry.path), p.error) for p in probes if p.error)
            for attempt in range(3):
                snapshot = (report.added, report.skipped_existing, len(report.failed))
                try:
                    with session_scope(url) as session:
                        ids = _register_chunk(session, probes, report)
                    break
                except IntegrityError:
                    # Another shard inserted one of these hashes meanwhile: roll the counters back, retry.
                    report.added, report.skipped_existing = snapshot[0], snapshot[1]
                    del report.failed[snapshot[2]:]
                    if attempt == 2:
                        raise
            all_ids.append(np.asarray(ids, dtype=np.int64))
            bar.update(len(chunk))
    bar.close()
    return np.unique(np.concatenate(all_ids)) if all_ids else np.zeros(0, dtype=np.int64)


# -- step 2: embed --------------------------------------------------------------------------------------

class _DecodeDataset:
    """Map-style dataset over (id, uri) arrays; returns (id, preprocessed tensor or None, failure reason)."""

    def __init__(self, ids: np.ndarray, uris: np.ndarray, transform: Any, max_bytes: int,
                 max_pixels: int) -> None:
        # numpy arrays, not Python lists: forked workers then share the pages instead of copying them.
        self.ids, self.uris, self.transform = ids, uris, transform
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, Any, str, str]:
        uri = self.uris[i].decode("utf-8")
        try:
            image = read_image_file(uri, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            return int(self.ids[i]), self.transform(image), "", uri
        except ImageError as exc:
            return int(self.ids[i]), None, exc.message, uri
        except OSError as exc:
            return int(self.ids[i]), None, f"cannot read the file: {exc}", uri


def _collate(items: list[tuple[int, Any, str, str]]) -> tuple[np.ndarray, Any, list[tuple[int, str, str]]]:
    import torch

    ok = [(i, t) for i, t, _, _ in items if t is not None]
    failed = [(i, uri, reason) for i, t, reason, uri in items if t is None]
    ids = np.asarray([i for i, _ in ok], dtype=np.int64)
    batch = torch.stack([t for _, t in ok]) if ok else None
    return ids, batch, failed


def _uris(session: Session, ids: np.ndarray) -> np.ndarray:
    # A bytes array, not a dict: DataLoader workers share it without copying Python objects.
    found = image_uris(session, ids)
    return np.array([found[int(i)].encode("utf-8") for i in ids], dtype=np.bytes_)


def embed_missing(settings: Settings, model: ModelVersion, candidates: np.ndarray | None, report: BuildReport,
                  progress: bool, stem_prefix: str = "run") -> None:
    """Embed live images (all, or `candidates`) that have no stored embedding for `model`."""
    from models.checkpoint import load_checkpoint
    from models.embedder import resolve_device

    store = settings.embeddings_dir(model.name)
    with session_scope(settings.resolved_database_url) as session:
        live = live_image_ids(session)
    todo = live if candidates is None else np.intersect1d(candidates, live)
    todo = np.setdiff1d(todo, versions.embedded_ids(store))
    if len(todo) == 0:
        return
    embedder = load_checkpoint(model.path, resolve_device(settings.device))
    embed_into_store(settings, embedder, store, todo, report, progress, stem_prefix, settings.num_workers)


def embed_into_store(settings: Settings, embedder: Embedder, store: Path, ids: np.ndarray, report: BuildReport,
                     progress: bool, stem_prefix: str, num_workers: int,
                     on_stored: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
    """Embed images `ids` from their files into embedding shards under `store`, flushed every
    `embed_flush_every` images (so a kill loses at most that much). A file that does not decode soft-deletes
    its row with the reason (BuildReport.failed). `on_stored(ids, vectors)` sees each shard once it is on disk.
    Used by index builds and by the service's catch-up at load."""
    import torch
    from tqdm import tqdm

    from models.embedder import eval_transform

    url = settings.resolved_database_url
    with session_scope(url) as session:
        uris = _uris(session, ids)
    device = next(embedder.parameters()).device
    dataset = _DecodeDataset(ids, uris, eval_transform(embedder.config), settings.max_upload_bytes,
                             settings.max_image_pixels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    buf_ids: list[np.ndarray] = []
    buf_vecs: list[np.ndarray] = []
    run_tag = f"{stem_prefix}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}"
    shard_no = 0

    def flush() -> None:
        nonlocal shard_no
        if buf_ids:
            shard_ids, shard_vecs = np.concatenate(buf_ids), np.concatenate(buf_vecs)
            versions.write_embedding_shard(store, f"{run_tag}-{shard_no:05d}", shard_ids, shard_vecs)
            if on_stored is not None:
                on_stored(shard_ids, shard_vecs)
            shard_no += 1
            buf_ids.clear()
            buf_vecs.clear()

    start = time.perf_counter()
    bar = tqdm(total=len(ids), desc="embed", unit="img", disable=not progress, dynamic_ncols=True)
    pending_failures: list[tuple[int, str, str]] = []
    for batch_ids, batch, failed in loader:
        if batch is not None:
            with torch.inference_mode():
                vectors = embedder(batch.to(device, non_blocking=True)).float().cpu().numpy()
            buf_ids.append(batch_ids)
            buf_vecs.append(vectors)
            report.embedded += len(batch_ids)
        pending_failures.extend(failed)
        bar.update(len(batch_ids) + len(failed))
        if sum(len(b) for b in buf_ids) >= settings.embed_flush_every:
            flush()
            _mark_failed(url, pending_failures, report)
    flush()
    _mark_failed(url, pending_failures, report)
    bar.close()
    elapsed = time.perf_counter() - start
    report.images_per_second = report.embedded / elapsed if elapsed > 0 else 0.0
    if progress:
        print(f"embedded {report.embedded} images in {elapsed:.1f}s: {report.images_per_second:.1f} images/s")


def _mark_failed(url: str, failures: list[tuple[int, str, str]], report: BuildReport) -> None:
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


# -- step 3: publish -------------------------------------------------------------------------------------

def _version_ids(version: IndexVersion) -> np.ndarray | None:
    path = Path(version.path) / versions.IDS_FILE
    return np.load(path) if path.exists() else None


def publish_index(settings: Settings, model: ModelVersion, report: BuildReport, factory: str | None = None,
                  force: bool = False, ondisk: bool = False) -> None:
    """Build an index over every live image's stored embedding and publish it, unless nothing changed."""
    url = settings.resolved_database_url
    store = settings.embeddings_dir(model.name)
    versions.sweep_tmp(settings.indexes_dir)
    with session_scope(url) as session:
        live = live_image_ids(session)
        current = active_index(session)
        if current is not None and current.model_version_id == model.id and not force \
                and (factory is None or factory == current.factory):
            held = _version_ids(current)
            if held is not None and np.array_equal(held, live):
                report.total_indexed = len(held)
                report.message = f"index {current.name} is up to date: nothing to publish"
                return
    ids, vectors = versions.load_embeddings(store, keep=live)
    missing = np.setdiff1d(live, ids)
    if len(missing):
        raise RuntimeError(f"{len(missing)} live images have no embedding (first: {missing[:10].tolist()}); "
                           "run the build (or merge) again")
    budget = _memory_budget(settings)
    factory = factory or choose_factory(len(ids), model.dim, budget)
    start = time.perf_counter()
    if ondisk and "IVF" in factory:
        index = _build_ivf_ondisk(store, live, model.dim, factory, ids, vectors, settings)
    else:
        index = build(ids, vectors, factory, budget, _recall_target(settings))
    build_seconds = time.perf_counter() - start
    name = new_version_name("index")

    workdir = index.params.pop("ondisk_workdir", None)

    def write(tmp: Path) -> None:
        if workdir:
            # The merged lists move with the version; load() finds them next to index.faiss.
            os.replace(Path(workdir) / "merged.ivfdata", tmp / "merged.ivfdata")
            shutil.rmtree(workdir, ignore_errors=True)
        index.save(tmp)
        np.save(tmp / versions.IDS_FILE, np.sort(ids))
        versions.link_shards(store, tmp / versions.EMBEDDINGS_DIR)

    path = versions.publish(settings.indexes_dir, name, write)
    with session_scope(url) as session:
        row = IndexVersion(name=name, model_version_id=model.id, path=str(path.resolve()), factory=factory,
                           ntotal=len(index), params=index.params,
                           metrics={"build_seconds": round(build_seconds, 3)})
        session.add(row)
        session.flush()
        promote(session, row)  # the SQL flip comes last
    report.index_version_name, report.total_indexed, report.factory = name, len(index), factory
    report.message = f"published index {name} ({factory}, {len(index)} vectors)"
    prune_versions(settings)


def _build_ivf_ondisk(store: Path, live: np.ndarray, dim: int, factory: str, ids: np.ndarray,
                      vectors: np.ndarray, settings: Settings) -> VectorIndex:
    """One trained IVF, one filled copy per embedding shard, merged with FAISS's on-disk IVF merge."""
    import faiss

    from index.vector_index import exact_knn

    rng = np.random.default_rng(0)
    trained = VectorIndex(dim, factory)
    sample = rng.choice(len(vectors), size=min(len(vectors), 200_000), replace=False)
    trained.train(vectors[sample])
    parts = []
    for _, shard_ids, shard_vecs in versions.iter_embedding_shards(store):
        mask = np.isin(shard_ids, live)
        part = VectorIndex(dim, factory, index=faiss.clone_index(trained.index))
        part.add(shard_ids[mask], np.asarray(shard_vecs[mask], dtype=np.float32))
        parts.append(part)
    workdir = settings.indexes_dir / f".ondisk-{new_version_name('tmp')}"
    merged = merge_ivf_ondisk(trained, parts, workdir)
    pick = rng.choice(len(vectors), size=min(len(vectors), 500), replace=False)
    _, truth = exact_knn(vectors[pick], vectors, ids, 11)
    merged.tune(vectors[pick], truth, 10, _recall_target(settings), query_ids=ids[pick])
    merged.params["ondisk_workdir"] = str(workdir)
    return merged


def prune_versions(settings: Settings) -> list[Path]:
    """Keep the active version and the newest `keep_versions` on disk; delete the other directories."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(IndexVersion).order_by(IndexVersion.created_at.desc(),
                                                             IndexVersion.id.desc())).all()
        keep = {r.name for r in rows if r.status == "active"} | {r.name for r in rows[: settings.keep_versions]}
        for row in rows:
            if row.name not in keep and row.status != "retired":
                row.status = "retired"
    return versions.prune(settings.indexes_dir, keep)


# -- entry points -----------------------------------------------------------------------------------------

def _model_for_build(settings: Settings) -> ModelVersion:
    with session_scope(settings.resolved_database_url) as session:
        model = ensure_model_version(session, settings)
        session.expunge(model)
    return model


def _finish(report: BuildReport, start: float, progress: bool) -> BuildReport:
    report.seconds = time.perf_counter() - start
    if progress:
        print(report.summary())
    return report


def build_index(settings: Settings, source: str | Path, *, shard: tuple[int, int] | None = None,
                factory: str | None = None, progress: bool = True) -> BuildReport:
    """Register `source`, embed what is missing, publish a new index version (not in shard mode)."""
    start = time.perf_counter()
    report = BuildReport(shard=shard)
    model = _model_for_build(settings)
    slice_ids = register_source(settings, source, shard, report, progress)
    embed_missing(settings, model, slice_ids if shard else None, report, progress,
                  stem_prefix=f"shard{shard[0]}of{shard[1]}" if shard else "run")
    if shard is None:
        publish_index(settings, model, report, factory=factory)
    else:
        report.message = (f"shard {shard[0]}/{shard[1]}: embeddings stored in {settings.embeddings_dir(model.name)}; "
                          "run `retrieval index merge` once every shard is done")
    return _finish(report, start, progress)


def _republish(settings: Settings, *, factory: str | None, ondisk: bool, force: bool, progress: bool,
               stem_prefix: str) -> BuildReport:
    start = time.perf_counter()
    report = BuildReport()
    model = _model_for_build(settings)
    embed_missing(settings, model, None, report, progress, stem_prefix=stem_prefix)
    publish_index(settings, model, report, factory=factory, force=force, ondisk=ondisk)
    return _finish(report, start, progress)


def merge_shards(settings: Settings, *, factory: str | None = None, ondisk: bool = False,
                 progress: bool = True) -> BuildReport:
    """After sharded runs: embed any live image still missing, then build and publish one index.

    ondisk=True (IVF factories): one filled IVF per embedding shard, merged with FAISS's on-disk merge.
    """
    return _republish(settings, factory=factory, ondisk=ondisk, force=False, progress=progress,
                      stem_prefix="merge")


def rebuild_index(settings: Settings, *, factory: str | None = None, progress: bool = True) -> BuildReport:
    """Re-type or compact the active index from stored embeddings (no image is decoded if none is missing)."""
    return _republish(settings, factory=factory, ondisk=False, force=True, progress=progress,
                      stem_prefix="rebuild")


@dataclass
class VerifyReport:
    version: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_index(settings: Settings, max_listed: int = 20) -> VerifyReport:
    """Check SQL and the active index agree: every live row indexed once; no deleted or unknown id indexed."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        current = active_index(session)
        if current is None:
            return VerifyReport(None, ["no active index version"])
        live = live_image_ids(session)
        known = np.fromiter(session.scalars(select(Image.id)), dtype=np.int64)
        name, path, sql_ntotal = current.name, Path(current.path), current.ntotal
    report = VerifyReport(name)
    if not (path / "index.faiss").exists():
        report.problems.append(f"index files of {name} are missing at {path}")
        return report
    index = VectorIndex.load(path)
    held = index.live_ids()

    def listed(what: str, ids: np.ndarray) -> None:
        if len(ids):
            report.problems.append(f"{len(ids)} {what}: {ids[:max_listed].tolist()}")

    unique, counts = np.unique(held, return_counts=True)
    listed("ids indexed more than once", unique[counts > 1])
    listed("live images missing from the index", np.setdiff1d(live, unique))
    listed("deleted images still in the index", np.setdiff1d(np.intersect1d(unique, known), live))
    listed("unknown ids in the index (no such image row)", np.setdiff1d(unique, known))
    if sql_ntotal != len(index):
        report.problems.append(f"SQL says {sql_ntotal} vectors, the index holds {len(index)}")
    return report

