"""Versioned on-disk layout, atomic publish, and embedding shards. Pure filesystem + numpy.

    <indexes_dir>/<version>/index.faiss        the FAISS index
                            index.json         dim, factory, kind, search params (nprobe/efSearch), counts
                            tombstones.npy     ids removed from an HNSW index (applied at search time)
                            ids.npy            the live ids of this version, sorted
                            embeddings/        float16 vectors + int64 ids, one pair of .npy per shard
    <indexes_dir>/.tmp-<version>-<pid>/        a version being written; never read, swept on the next run

A version is written under its temporary name and renamed into place (rename is atomic on one filesystem),
so a reader either sees a complete directory or none. Marking it active is the caller's (SQL) job, last.

Embedding shards: `<stem>.f16.npy` (float16 [n, d]) and `<stem>.ids.npy` (int64 [n]). The ids file is renamed
into place after the vectors file, so a shard counts only once both exist: a crash mid-write leaves at most an
orphan vectors file, which readers ignore.

Merged shards (fold_shards) fold many small shards into one. A merged shard names the shards it replaces in
`<stem>.sources.json`, written first (the ids file, its commit, comes last); once it counts, readers skip those
sources (shard_stems), so at every moment each row is counted once: from the sources before the commit, from the
merged shard after. Deleting the sources afterwards is tidying, which the next merge finishes if a crash interrupted it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

TMP_PREFIX = ".tmp-"
EMBEDDINGS_DIR = "embeddings"
IDS_FILE = "ids.npy"
VEC_SUFFIX = ".f16.npy"
IDS_SUFFIX = ".ids.npy"
SOURCES_SUFFIX = ".sources.json"
SHARD_SUFFIXES = (IDS_SUFFIX, VEC_SUFFIX, SOURCES_SUFFIX)  # removal order: the commit marker first
FOLD_RETRIES = 3
T = TypeVar("T")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    _save_atomic(path, lambda handle: np.save(handle, array))


def _save_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise


def write_embedding_shard(directory: str | Path, stem: str, ids: np.ndarray, vectors: np.ndarray) -> Path:
    """Write one shard (float16 vectors, then ids: the ids file is the commit marker)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    _save_npy_atomic(directory / f"{stem}{VEC_SUFFIX}", vectors)
    try:
        _save_npy_atomic(directory / f"{stem}{IDS_SUFFIX}", ids)
    except BaseException:
        (directory / f"{stem}{VEC_SUFFIX}").unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return directory / f"{stem}{IDS_SUFFIX}"


def shard_stems(directory: str | Path) -> list[str]:
    """Complete shards (both files present) not replaced by a merged shard, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = {name for name in os.listdir(directory) if not name.startswith(".")}
    complete = sorted(name[: -len(IDS_SUFFIX)] for name in names
                      if name.endswith(IDS_SUFFIX) and f"{name[: -len(IDS_SUFFIX)]}{VEC_SUFFIX}" in names)
    replaced = {source for stem in complete if f"{stem}{SOURCES_SUFFIX}" in names
                for source in _merged_sources(directory, stem)}
    return [stem for stem in complete if stem not in replaced]


def _merged_sources(directory: Path, stem: str) -> list[str]:
    try:
        with open(directory / f"{stem}{SOURCES_SUFFIX}", "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:  # a later fold is deleting this merged shard (its own sources went long ago)
        return []


def _again_if_folded(read: Callable[..., T]) -> Callable[..., T]:
    """Run a whole-store read again when a shard it listed was deleted under it by a fold (which committed the
    merged shard holding those rows first, so the next listing finds them)."""

    @functools.wraps(read)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        for _ in range(FOLD_RETRIES):
            try:
                return read(*args, **kwargs)
            except FileNotFoundError:
                continue
        return read(*args, **kwargs)

    return wrapped


def iter_embedding_shards(directory: str | Path, mmap: bool = True) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, ids, float16 vectors) per complete shard; memory-mapped so millions of rows stay on disk."""
    directory = Path(directory)
    mode = "r" if mmap else None
    for stem in shard_stems(directory):
        ids = np.load(directory / f"{stem}{IDS_SUFFIX}")
        vectors = np.load(directory / f"{stem}{VEC_SUFFIX}", mmap_mode=mode)
        yield stem, ids, vectors


@_again_if_folded
def embedded_ids(directory: str | Path) -> np.ndarray:
    """Sorted unique ids with a stored embedding."""
    parts = [ids for _, ids, _ in iter_embedding_shards(directory)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


@_again_if_folded
def load_embeddings(directory: str | Path, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) from all shards, one row per id (the latest shard wins), restricted to `keep`."""
    ids_parts, vec_parts = [], []
    for _, ids, vectors in iter_embedding_shards(directory):
        mask = np.isin(ids, keep) if keep is not None else np.ones(len(ids), dtype=bool)
        if mask.any():
            ids_parts.append(ids[mask])
            vec_parts.append(np.asarray(vectors[mask], dtype=np.float32))
    if not ids_parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return _last_per_id(np.concatenate(ids_parts), np.concatenate(vec_parts))


def latest_rows(ids: np.ndarray) -> np.ndarray:
    """Positions of one row per id, its last occurrence (a re-embedded image), in id order."""
    _, last = np.unique(ids[::-1], return_index=True)
    return len(ids) - 1 - last


def _last_per_id(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per id, the last occurrence, sorted by id."""
    pick = latest_rows(ids)
    return ids[pick], vectors[pick]


def fold_shards(directory: str | Path, sources: list[str], stem: str,
                 drop: Callable[[np.ndarray, float], np.ndarray] | None = None) -> int:
    """Fold the complete shards `sources` into one shard `stem` (a row of a later source wins, as when loading),
    then delete them. Returns the rows written. Crash-safe at every step (see the module docstring).

    `stem` must sort where the sources did relative to the shards left out, so "the latest shard wins" holds.
    `drop(ids, written_at)` -> mask of a source's rows to leave out (written_at: its commit's mtime).
    One merge at a time per directory: the caller holds a lease."""
    directory = Path(directory)
    remove_replaced(directory)
    ids_parts, vec_parts = [], []
    for source in sorted(sources):
        ids = np.load(directory / f"{source}{IDS_SUFFIX}")
        vectors = np.load(directory / f"{source}{VEC_SUFFIX}")
        if drop is not None:
            keep = ~drop(ids, (directory / f"{source}{IDS_SUFFIX}").stat().st_mtime)
            ids, vectors = ids[keep], vectors[keep]
        ids_parts.append(ids)
        vec_parts.append(vectors)
    if not ids_parts:
        return 0
    ids, vectors = _last_per_id(np.concatenate(ids_parts), np.concatenate(vec_parts))
    manifest = json.dumps(sorted(sources)).encode()  # first: whatever a kill leaves, remove_replaced finds
    # Each rename durable before the next: after a power loss the commit (ids) never exists without the others.
    _save_atomic(directory / f"{stem}{SOURCES_SUFFIX}", lambda handle: handle.write(manifest))
    _fsync_dir(directory)
    _save_npy_atomic(directory / f"{stem}{VEC_SUFFIX}", vectors)
    _fsync_dir(directory)
    _save_npy_atomic(directory / f"{stem}{IDS_SUFFIX}", ids)  # the commit: from here on the sources are skipped
    _fsync_dir(directory)
    remove_replaced(directory)
    return len(ids)


def remove_replaced(directory: str | Path) -> int:
    """Delete the files of shards a committed merged shard replaces (a merge killed before it had deleted them
    all), and the leftovers of a merge killed before its commit. Only under the merge lease. Returns files removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    names = {name for name in os.listdir(directory) if not name.startswith(".")}
    doomed: list[str] = []
    for manifest in sorted(n for n in names if n.endswith(SOURCES_SUFFIX)):
        stem = manifest[: -len(SOURCES_SUFFIX)]
        if f"{stem}{IDS_SUFFIX}" in names and f"{stem}{VEC_SUFFIX}" in names:  # committed (as shard_stems counts)
            doomed += [f"{source}{suffix}" for source in _merged_sources(directory, stem) for suffix in SHARD_SUFFIXES]
        else:  # never committed: the merge's own partial files go, its sources stay
            doomed += [f"{stem}{VEC_SUFFIX}", manifest]
    removed = 0
    for name in doomed:
        if name in names:
            (directory / name).unlink(missing_ok=True)
            removed += 1
    if removed:
        _fsync_dir(directory)
    return removed


def link_shards(source: str | Path, target: str | Path) -> int:
    """Hard-link (or copy across filesystems) every complete shard of `source` into `target`.

    A fold may run meanwhile (a publish does not hold the compaction lease). It commits its merged shard, which
    names the shards it replaces, before deleting any of them, so a pass that finds a listed file gone lists again
    and links the merged shard: `target` then reads the same rows as `source`."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for _ in range(FOLD_RETRIES + 1):
        stems = shard_stems(source)
        if all(_link_shard(source, target, stem) for stem in stems):
            return len(stems)
    raise RuntimeError(f"embedding shards in {source} kept vanishing while being linked; run it again")


def _link_shard(source: Path, target: Path, stem: str) -> bool:
    """Link one shard's files (its manifest when it has one, its commit last); False when one vanished."""
    for suffix in (VEC_SUFFIX, SOURCES_SUFFIX, IDS_SUFFIX):
        src, dst = source / f"{stem}{suffix}", target / f"{stem}{suffix}"
        if dst.exists() or (suffix == SOURCES_SUFFIX and not src.exists()):
            continue
        try:
            link_or_copy(src, dst)
        except FileNotFoundError:
            return False
    return True


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link an immutable file (free on one filesystem), or copy it across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish(indexes_dir: str | Path, name: str, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)`, then rename tmp_dir to <indexes_dir>/<name>. Returns the final path."""
    indexes_dir = Path(indexes_dir)
    indexes_dir.mkdir(parents=True, exist_ok=True)
    final = indexes_dir / name
    if final.exists():
        raise FileExistsError(f"index version {final} already exists")
    tmp = indexes_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(indexes_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def sweep_tmp(indexes_dir: str | Path) -> list[Path]:
    """Remove half-written versions left by a killed run (their writer pid is gone)."""
    indexes_dir = Path(indexes_dir)
    removed: list[Path] = []
    if not indexes_dir.is_dir():
        return removed
    for path in indexes_dir.glob(f"{TMP_PREFIX}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(indexes_dir: str | Path, keep: set[str]) -> list[Path]:
    """Delete version directories not named in `keep` (the caller picks the last N plus the active one)."""
    indexes_dir = Path(indexes_dir)
    removed: list[Path] = []
    if not indexes_dir.is_dir():
        return removed
    for path in indexes_dir.iterdir():
        if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
