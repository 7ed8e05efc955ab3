"""Reading a source: a folder (labels = sub-folder names, symlinked sub-folders followed), a CSV manifest, or one
image file."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.data import IMAGE_SUFFIXES

MANIFEST_DELIMITERS = ",;\t"  # spreadsheets save ';' where ',' is the decimal mark
URL = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)  # a manifest row naming a URL, not a file


class SourceError(ValueError):
    """A source that cannot be read as a folder, a manifest or an image, said in one line (a manifest line found
    not to be UTF-8 midway: the rows before it are registered, and a rerun of the mended file goes on from them)."""


@dataclass
class SourceEntry:
    """One image a source lists. `listed`: its label and metadata were written in a manifest, which a re-run
    applies to an image already registered; `problem`: why the row cannot be read (reported as a failure)."""

    path: Path
    label: str | None
    meta: dict[str, Any]
    listed: bool = False
    problem: str | None = None


def iter_source(source: str | Path, shard: tuple[int, int] | None = None,
                skip: Path | None = None) -> Iterator[SourceEntry]:
    """Stream entries from a folder (labels = sub-folder names), a CSV manifest (path,label,extra...) or one
    image file. `skip`: a folder never walked into (the service's data dir, whose thumbnails and stored uploads
    would come back as near-duplicates of every image when a build is run on a folder that holds it)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        entries: Iterator[SourceEntry] = iter([SourceEntry(source.resolve(), None, {})])
    elif source.is_file():
        entries = _iter_csv(source)
    else:
        entries = _iter_folder(source, skip)
    for row_number, entry in enumerate(entries):
        if shard is None or row_number % shard[1] == shard[0]:
            yield entry


def _links_back(here: Path, name: str, root: Path) -> bool:
    """True when sub-folder `name` of `here` is (a link to) `here` itself or a folder above it: a loop."""
    real = os.path.realpath(here / name)
    above = {os.path.realpath(p) for p in (here, *here.parents) if p.is_relative_to(root)}
    return real in above or os.path.realpath(here).startswith(real + os.sep)


def _iter_folder(root: Path, skip: Path | None = None) -> Iterator[SourceEntry]:
    """Every image file under `root`. Symlinked sub-folders are followed (photo libraries and dataset layouts
    link class folders in); a link back to a folder above it (a loop) is skipped, and so are hidden files and
    folders (.git, .thumbnails, a trash folder) and `skip`."""
    if not root.exists():
        raise FileNotFoundError(f"source {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"source {root} is neither a folder, a CSV manifest nor an image file")
    root = root.resolve()
    skipped = os.path.realpath(skip) if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        # Sorted: a stable order, so `--shard i/n` slices agree across machines.
        dirnames[:] = sorted(name for name in dirnames if not name.startswith(".")
                             and not _links_back(here, name, root)
                             and os.path.realpath(here / name) != skipped)
        rel = here.relative_to(root)
        label = None if rel == Path(".") else rel.as_posix()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                yield SourceEntry(here / name, label, {})


def _iter_csv(manifest: Path) -> Iterator[SourceEntry]:
    """Rows of a CSV manifest: UTF-8 (with or without the byte-order mark spreadsheets write), separated by ',',
    ';' or tabs, with a 'path' column (any case) and optionally 'label'; other columns become metadata."""
    base = manifest.resolve().parent
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise glue onto 'path'.
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        try:
            head = handle.readline()
            try:  # only the separator: the rest of Excel's dialect ("" inside quotes) stays
                delimiter = csv.Sniffer().sniff(head, MANIFEST_DELIMITERS).delimiter
            except csv.Error:  # one column: nothing to sniff
                delimiter = ","
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter=delimiter)  # one row at a time: millions of rows are fine
            # 'Path' or ' path ' as written by hand; other column names (metadata keys) keep their case.
            columns = [name.strip() for name in reader.fieldnames or []]
            columns = [name.lower() if name.lower() in ("path", "label") else name for name in columns]
        except UnicodeDecodeError:
            not_utf8 = f"{manifest} is neither an image nor a UTF-8 CSV manifest (save it as CSV UTF-8)"
            raise SourceError(not_utf8) from None
        if "path" not in columns:
            raise SourceError(f"{manifest} is neither an image nor a CSV manifest with a 'path' column (its first "
                              f"line reads {head.strip()[:80]!r})")
        reader.fieldnames = columns
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise SourceError(f"{manifest}: line {reader.line_num + 1} is not UTF-8 ({exc.reason}); save it as CSV "
                                  "UTF-8") from None
            raw = (row.pop("path") or "").strip()
            if not raw:
                continue
            label = (row.pop("label", None) or "").strip() or None
            meta = {k: v for k, v in row.items() if k and v not in (None, "")}
            if URL.match(raw):
                yield SourceEntry(Path(raw), label, meta, problem=f"{raw} is a URL: the build reads files, so download "
                                                                  "it and list its path")
                continue
            path = Path(raw)
            yield SourceEntry(path if path.is_absolute() else (base / path).resolve(), label, meta, listed=True)
