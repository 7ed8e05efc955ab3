"""VectorIndex: a FAISS index over L2-normalised vectors (inner product = cosine) whose ids are images.id.

Pure FAISS + numpy. Saved with its parameters next to it; writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np

INDEX_FILE = "index.faiss"
PARAMS_FILE = "index.json"


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    return vectors


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)


class VectorIndex:
    """Inner-product FAISS index with 64-bit ids, built from a factory string ("Flat" by default)."""

    def __init__(self, dim: int, factory: str = "Flat", index: faiss.Index | None = None,
                 params: dict[str, Any] | None = None) -> None:
        self.dim = dim
        self.factory = factory
        self.params: dict[str, Any] = dict(params or {})
        if index is None:
            base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            index = base if factory.startswith("IDMap") else faiss.IndexIDMap2(base)
        self.index = index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        if not self.index.is_trained:
            self.index.train(_as_float32(vectors))

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        vectors, ids = _as_float32(vectors), _as_ids(ids)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"{len(ids)} ids for vectors of shape {vectors.shape}, dim {self.dim}")
        if len(ids) == 0:
            return
        self.train(vectors)
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        ids = _as_ids(ids)
        if len(ids) == 0:
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each [Q, k]; missing neighbours have id -1."""
        queries = _as_float32(queries)
        if len(self) == 0:
            q = len(queries)
            return np.full((q, k), -np.inf, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)
        scores, ids = self.index.search(queries, k)
        return scores, ids

    def ids(self) -> np.ndarray:
        """All ids held (IDMap-backed indexes)."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".index.", dir=directory)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, directory / INDEX_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"dim": self.dim, "factory": self.factory, "params": self.params, "ntotal": len(self)}
        tmp_meta = directory / f".{PARAMS_FILE}.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, directory / PARAMS_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> VectorIndex:
        directory = Path(directory)
        meta = json.loads((directory / PARAMS_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        return cls(dim=meta["dim"], factory=meta["factory"], index=index, params=meta.get("params"))
