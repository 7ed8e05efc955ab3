"""Step 1, register: hash each source file (sha256 of its bytes), read its header, insert the rows that are not
there yet, committed in chunks. Dedup is by sha256, so a re-run inserts nothing twice."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Image
from app.db.session import session_scope
from app.indexing.report import BuildReport
from app.indexing.sources import SourceEntry, iter_source
from app.settings import Settings

REGISTER_CHUNK = 512


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
    except Exception:  # Pillow raises many types on junk headers
        return _Probe(entry, error="the file is not an image in a format this service reads")
    if width * height > max_pixels:
        return _Probe(entry, error=f"the image is {width}x{height} pixels; the limit is {max_pixels}")
    return _Probe(entry, digest, width, height)


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
            report.seen += len(chunk)
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
