"""Step 1, register: hash each source file (sha256 of its bytes), read its header, insert the rows that are not
there yet, committed in chunks. Dedup is by sha256, so a re-run inserts nothing twice.

A folder changes between builds, and the rows follow it: a file moved or renamed (the same bytes, its old path
gone) keeps its row with the new path; a file overwritten with other bytes gets a new row and its old row is
retired (soft-deleted: its vector leaves the next index version); a file deleted is reported, and retired with
`prune` (a deleted photo, or a folder not mounted this time: the user says which)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
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
LABEL_MAX = Image.__table__.c.label.type.length  # a folder path made label, or a manifest's, can be longer


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
    """Hash the file and read its header (the upright dimensions only: the full decode happens when embedding)."""
    from PIL import Image as PILImage

    from app.images import ORIENTATION_TAG

    if entry.problem is not None:
        return _Probe(entry, error=entry.problem)
    if entry.label is not None and len(entry.label) > LABEL_MAX:
        return _Probe(entry, error=f"its label is {len(entry.label)} characters long; labels are at most {LABEL_MAX}")
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
            # As the API stores an upload's: a phone photo turned by its EXIF orientation is that way up.
            turned = image.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)
    except Exception:  # Pillow raises many types on junk headers
        return _Probe(entry, error="the file is not an image in a format this service reads")
    if width * height > max_pixels:
        return _Probe(entry, error=f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    return _Probe(entry, digest, *((height, width) if turned else (width, height)))


def _register_chunk(session: Session, probes: list[_Probe], report: BuildReport) -> list[int]:
    """Insert rows for new hashes and let known rows follow their files; returns the ids of every image of this
    chunk (new or existing). Rows retired by a build come back when their bytes do (an edit reverted, a folder
    mounted again); rows deleted through the API stay deleted."""
    good = [(str(p.entry.path.resolve()), p) for p in probes if p.sha256 is not None]
    at_path = {path: p.sha256 for path, p in good}  # what each file of this chunk holds now
    existing = {row.sha256: row for row in session.scalars(
        select(Image).where(Image.sha256.in_(sorted(set(at_path.values())))))}
    ids: list[int] = []
    new: dict[str, Image] = {}
    for path, probe in good:
        assert probe.sha256 is not None
        row = existing.get(probe.sha256)
        if row is None:
            if probe.sha256 in new:
                report.skipped_existing += 1  # the same bytes twice in one source
            else:
                new[probe.sha256] = Image(sha256=probe.sha256, uri=path, label=probe.entry.label,
                                          width=probe.width, height=probe.height, meta=dict(probe.entry.meta))
            continue
        meta = row.meta or {}
        if row.deleted_at is not None and meta.get("decode_error"):
            report.failed.append((str(probe.entry.path), meta["decode_error"]))
            continue
        report.skipped_existing += 1
        if row.deleted_at is not None and "retired" not in meta:
            continue  # deleted through the API
        if row.deleted_at is not None:
            row.deleted_at, row.meta, row.uri = None, {k: v for k, v in meta.items() if k != "retired"}, path
            report.revived += 1
        elif row.uri != path and not _still_holds(row, at_path):  # moved, renamed, or names swapped
            if _label_from_folder(row) and probe.entry.label != row.label and not probe.entry.listed:
                row.label = probe.entry.label  # moved to another sub-folder: labels are sub-folder names
            row.uri = path
            report.moved += 1
        if probe.entry.listed and _apply_listing(row, probe.entry):
            report.updated += 1
        ids.append(row.id)
    session.add_all(new.values())
    session.flush()
    report.added += len(new)
    ids.extend(image.id for image in new.values())
    _retire_overwritten(session, at_path, report)
    return ids


def _apply_listing(row: Image, entry: SourceEntry) -> bool:
    """A manifest row's label and metadata onto the image it lists, as a re-run of an edited manifest expects:
    a label written there replaces the stored one, each metadata column sets its key (keys it does not list, and
    empty cells, leave what is stored: set through the API, or by another manifest). True when anything changed."""
    meta = row.meta or {}
    changed_meta = {key: value for key, value in entry.meta.items() if meta.get(key) != value}
    relabel = entry.label is not None and entry.label != row.label
    if relabel:
        row.label = entry.label
    if changed_meta:
        row.meta = {**meta, **changed_meta}
    return relabel or bool(changed_meta)


def _label_from_folder(row: Image) -> bool:
    """Whether the row's label is the sub-folder its file was in (a folder build's), not one set by hand or a
    manifest: then a move to another sub-folder relabels it."""
    if row.label is None:
        return True
    return Path(row.uri).parent.as_posix().endswith("/" + row.label)


def file_gone(path: str) -> bool:
    """Only a file that is not there: a folder unreadable for now (permissions, a stale network mount) is not
    evidence that its photos left."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def _still_holds(row: Image, at_path: dict[str, str]) -> bool:
    """Whether the file at the row's path still holds the row's bytes: known when that file is in this chunk,
    else assumed while it exists (hashing it again would double the build's reads)."""
    if row.uri in at_path:
        return at_path[row.uri] == row.sha256
    return not file_gone(row.uri)


def _retire_overwritten(session: Session, at_path: dict[str, str], report: BuildReport) -> None:
    """A live row at a path of this chunk whose file holds other bytes now (overwritten, or another file moved or
    copied over it; had its own bytes been elsewhere in this chunk, the row would have moved there above): its
    vector no longer matches the file, nor does its thumbnail, so it is retired. Its bytes found later bring it
    back."""
    session.flush()  # the rows moved above, before asking which rows each path holds
    now = datetime.now(UTC)
    for old in session.scalars(select(Image).where(Image.uri.in_(list(at_path)), Image.deleted_at.is_(None))):
        if old.sha256 != at_path[old.uri]:
            _retire(old, now, "its file was overwritten with other bytes")
            report.replaced += 1


def _retire(image: Image, now: datetime, why: str) -> None:
    """Soft-delete a row a build found stale, saying why; its bytes found again bring it back (_register_chunk)."""
    image.deleted_at = now
    image.meta = {**(image.meta or {}), "retired": why}


def missing_files(settings: Settings, source: str | Path) -> list[tuple[int, str]]:
    """(id, path) of the live images registered from folder `source` whose file is no longer there. Uploads kept
    in the data dir are not the folder's, wherever it is, unless the folder is itself in the data dir (the demo's)."""
    root = Path(source).resolve()
    if not root.is_dir():
        return []  # a manifest or one file lists what it holds, not what left
    prefix, data_dir = str(root) + os.sep, str(settings.data_dir.resolve()) + os.sep
    # A folder inside the data dir (the demo's export) holds its own files; else the data dir's are uploads.
    own_data_dir = prefix.startswith(data_dir)
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(select(Image.id, Image.uri).where(
            Image.deleted_at.is_(None), Image.uri.startswith(prefix, autoescape=True)))
        # startswith again: SQLite's LIKE ignores ASCII case, and /photos is not /Photos.
        return [(image_id, uri) for image_id, uri in rows
                if uri.startswith(prefix) and (own_data_dir or not uri.startswith(data_dir)) and file_gone(uri)]


def retire_missing(settings: Settings, source: str | Path, report: BuildReport, prune: bool) -> None:
    """Report the images whose file left folder `source`; with `prune`, retire them (their vectors leave the
    next index version; the rows stay, soft-deleted, with the reason)."""
    gone = missing_files(settings, source)
    report.gone = [uri for _, uri in gone]
    if not prune or not gone:
        return
    now = datetime.now(UTC)
    with session_scope(settings.resolved_database_url) as session:
        for image in session.scalars(select(Image).where(Image.id.in_([image_id for image_id, _ in gone]),
                                                         Image.deleted_at.is_(None))):
            _retire(image, now, "its file left the folder (index build --prune)")
            report.pruned += 1


def register_source(settings: Settings, source: str | Path, shard: tuple[int, int] | None,
                    report: BuildReport, progress: bool, prune: bool = False) -> np.ndarray:
    """Register every image of `source` (see the module docstring); the ids of its live images. Unsharded, the
    images whose file left a folder source are then reported (retired with `prune`)."""
    from tqdm import tqdm

    url = settings.resolved_database_url
    all_ids: list[np.ndarray] = []
    bar = tqdm(desc="register", unit="file", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(2, settings.num_workers * 2)) as pool:  # hashing is I/O bound
        for chunk in _chunks(iter_source(source, shard, skip=settings.data_dir), REGISTER_CHUNK):
            report.seen += len(chunk)
            probes = list(pool.map(lambda e: _probe(e, settings.max_upload_bytes, settings.max_image_pixels),
                                   chunk))
            report.failed.extend((str(p.entry.path), p.error) for p in probes if p.error)
            for attempt in range(3):
                counters = ("added", "skipped_existing", "moved", "revived", "replaced")
                snapshot = {name: getattr(report, name) for name in counters}
                failed_before = len(report.failed)
                try:
                    with session_scope(url) as session:
                        ids = _register_chunk(session, probes, report)
                    break
                except IntegrityError:
                    # Another shard inserted one of these hashes meanwhile: roll the counters back, retry.
                    for name, value in snapshot.items():
                        setattr(report, name, value)
                    del report.failed[failed_before:]
                    if attempt == 2:
                        raise
            all_ids.append(np.asarray(ids, dtype=np.int64))
            bar.update(len(chunk))
    bar.close()
    # A shard sees a slice of the folder (every shard's build would report the rest); a folder with no file at all
    # is an unmounted drive or a wrong path far more often than a library emptied on purpose (the build then stops).
    if shard is None and report.seen:
        retire_missing(settings, source, report, prune)
    return np.unique(np.concatenate(all_ids)) if all_ids else np.zeros(0, dtype=np.int64)
