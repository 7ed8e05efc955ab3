"""Reading a source: a folder (labels = sub-folder names, symlinked sub-folders followed) or a CSV manifest."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


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


def _links_back(here: Path, name: str, root: Path) -> bool:
    """True when sub-folder `name` of `here` is (a link to) `here` itself or a folder above it: a loop."""
    real = os.path.realpath(here / name)
    above = {os.path.realpath(p) for p in (here, *here.parents) if p.is_relative_to(root)}
    return real in above or os.path.realpath(here).startswith(real + os.sep)


def _iter_folder(root: Path) -> Iterator[SourceEntry]:
    """Every image file under `root`. Symlinked sub-folders are followed (photo libraries and dataset layouts
    link class folders in); a link back to a folder above it (a loop) is skipped."""
    if not root.is_dir():
        raise FileNotFoundError(f"source {root} is neither a folder nor a CSV manifest")
    root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        # Sorted: a stable order, so `--shard i/n` slices agree across machines.
        dirnames[:] = sorted(name for name in dirnames if not _links_back(here, name, root))
        rel = here.relative_to(root)
        label = None if rel == Path(".") else rel.as_posix()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                yield SourceEntry(here / name, label, {})


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
