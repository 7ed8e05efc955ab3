"""Reading the stored vectors of a few ids without opening every embedding shard.

An index type that keeps no vectors (IVF) cannot give one back, so similar-by-id, MMR and duplicates read them
from the embedding store. `versions.load_embeddings` opens every shard to do that; ShardLookup keeps where each id
lives (which shard, which row) and opens only the shards that hold the ids asked for. It is built on first use
(every ids file is read once; no vectors file), learns new shards incrementally when an id is not found, and is
rebuilt when a shard it knew disappeared (a merge replaced it): a few ids read O(shards holding them) files.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from index import versions

# New shards are kept in a dict until this many ids, then folded into the sorted arrays by a rebuild.
OVERLAY_MAX = 10_000


class ShardLookup:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._built = False
        self._stems: list[str] = []
        self._stems_set: set[str] = set()
        self._ids = np.zeros(0, dtype=np.int64)  # sorted; one entry per id (the latest shard's)
        self._shard = np.zeros(0, dtype=np.int32)  # index into _stems
        self._row = np.zeros(0, dtype=np.int64)
        self._overlay: dict[int, tuple[str, int]] = {}  # ids of shards learnt since the build
        self._learnt: set[str] = set()

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, float32 vectors) for `ids`, in the order asked; ids with no stored vector are left out."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        try:
            return self._read_rows(ids, self._places(ids, rebuild=False))
        except FileNotFoundError:  # a merge replaced a shard since the map was made: rebuild, read again
            return self._read_rows(ids, self._places(ids, rebuild=True))

    def _places(self, ids: np.ndarray, rebuild: bool) -> list[tuple[str, int] | None]:
        with self._lock:
            if rebuild or not self._built:
                self._rebuild()
            places = self._locate(ids)
            if any(place is None for place in places):
                self._learn_new_shards()
                places = self._locate(ids)
            return places

    def _locate(self, ids: np.ndarray) -> list[tuple[str, int] | None]:
        places: list[tuple[str, int] | None] = []
        at = np.searchsorted(self._ids, ids)
        for image_id, i in zip(ids.tolist(), at.tolist(), strict=True):
            place = self._overlay.get(image_id)
            if place is None and i < len(self._ids) and self._ids[i] == image_id:
                place = (self._stems[self._shard[i]], int(self._row[i]))
            places.append(place)
        return places

    def _read_rows(self, ids: np.ndarray, places: list[tuple[str, int] | None]) -> tuple[np.ndarray, np.ndarray]:
        by_stem: dict[str, list[int]] = {}
        for position, place in enumerate(places):
            if place is not None:
                by_stem.setdefault(place[0], []).append(position)
        vectors: dict[int, np.ndarray] = {}
        for stem, positions in by_stem.items():
            stored = np.load(self.directory / f"{stem}{versions.VEC_SUFFIX}", mmap_mode="r")
            rows = [places[p][1] for p in positions]  # type: ignore[index]
            for position, vector in zip(positions, np.asarray(stored[rows], dtype=np.float32), strict=True):
                vectors[position] = vector
        kept = sorted(vectors)
        if not kept:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return ids[kept], np.stack([vectors[p] for p in kept])

    def _rebuild(self) -> None:
        stems = versions.shard_stems(self.directory)
        parts = [np.load(self.directory / f"{stem}{versions.IDS_SUFFIX}") for stem in stems]
        if parts:
            ids = np.concatenate(parts)
            shard = np.concatenate([np.full(len(p), n, dtype=np.int32) for n, p in enumerate(parts)])
            row = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
            pick = versions.latest_rows(ids)  # the latest shard (by name) wins, as in load_embeddings
            self._ids, self._shard, self._row = ids[pick], shard[pick], row[pick]
        else:
            self._ids = np.zeros(0, dtype=np.int64)
            self._shard, self._row = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        self._stems, self._overlay, self._learnt, self._built = stems, {}, set(), True
        self._stems_set = set(stems)

    def _learn_new_shards(self) -> None:
        """Read the ids of shards written since the build (e.g. API adds); rebuild if a known one is gone."""
        stems = versions.shard_stems(self.directory)
        if not self._stems_set | self._learnt <= set(stems):
            self._rebuild()
            return
        for stem in (s for s in stems if s not in self._learnt and s not in self._stems_set):
            self._learnt.add(stem)
            for row, image_id in enumerate(np.load(self.directory / f"{stem}{versions.IDS_SUFFIX}").tolist()):
                current = self._locate(np.array([image_id], dtype=np.int64))[0]
                if current is None or current[0] <= stem:
                    self._overlay[image_id] = (stem, row)
        if len(self._overlay) > OVERLAY_MAX:
            self._rebuild()
