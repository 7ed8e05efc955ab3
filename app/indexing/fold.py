"""Folding the one-row embedding shards of API adds into one shard (index/versions.fold_shards does the files).

Every POST /v1/images writes its own fsynced shard (app.deployment.write_api_embedding), so that the add is
durable before the 201. Left alone they grow by one file pair per add, and everything that reads the store opens
them all. Compaction (and `index rebuild`) folds them, under the compaction lease, into one merged shard named to
sort first among the API shards: what was added after it still wins, as it did before the fold.

Vectors of images deleted after their shard was written are left out (`DELETE_MARGIN_S` covers clocks that
differ between replicas): a revived image writes a new shard after its deletion, so its vector is kept.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.db.models import Image
from app.db.session import session_scope
from index import versions

API_SHARD_PREFIX = "api"
# Sorts before every `api-<12-digit id>-...` and `api-catchup-...` stem: later API shards win over it.
MERGED_PREFIX = f"{API_SHARD_PREFIX}-{0:012d}-merged"
DELETE_MARGIN_S = 5.0


def api_shards(store: Path) -> list[str]:
    return [stem for stem in versions.shard_stems(store) if stem.startswith(f"{API_SHARD_PREFIX}-")]


def fold_api_shards(url: str, store: Path) -> int:
    """Fold the API shards of one model's store into one (the caller holds the compaction lease). Returns how many
    shards were folded (0 when there are fewer than two)."""
    versions.remove_replaced(store)  # finish a fold a kill interrupted
    # Earlier merged shards stay as they are: folding them again would rewrite every API-added vector at each
    # compaction (work growing with the square of the adds). One merged shard per compaction is few files.
    sources = [stem for stem in api_shards(store) if not stem.startswith(MERGED_PREFIX)]
    if len(sources) < 2:
        return 0
    with session_scope(url) as session:
        deleted = dict(session.execute(select(Image.id, Image.deleted_at).where(Image.deleted_at.is_not(None))).all())
    deleted_at = {image_id: _epoch(when) for image_id, when in deleted.items()}

    def drop(ids: np.ndarray, written_at: float) -> np.ndarray:
        return np.array([deleted_at.get(i, -np.inf) > written_at + DELETE_MARGIN_S for i in ids.tolist()], dtype=bool)

    stem = f"{MERGED_PREFIX}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}"
    versions.fold_shards(store, sources, stem, drop=drop)
    return len(sources)


def _epoch(when: datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
