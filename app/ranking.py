"""How a candidate list becomes the page a search returns: effort, paging (offset, min_score), diversity
(crowding by a group key, maximal marginal relevance), and the Rocchio query of relevance feedback.

Pure numpy over hits already joined with SQL; app/serving.py fetches the candidates and calls these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from app.errors import ApiError
from app.schemas import SearchHit

Effort = Literal["fast", "balanced", "exact"]
# Rocchio weights: the mean of the positives minus half the mean of the negatives (a negative should push the
# query away from it, not cancel a positive as alike as itself).
POSITIVE_WEIGHT, NEGATIVE_WEIGHT = 1.0, 0.5
# Diversity re-ranks a candidate pool this many times the page (at least POOL_MIN), widened x4 while crowding
# leaves the page short, up to POOL_MAX candidates.
POOL_FACTOR, POOL_MIN, POOL_MAX = 4, 50, 2000

OFFSET_DOC = ("Skip this many results first (deep pages: `offset + k` at most RETRIEVAL_MAX_K). With `min_score` "
              "a page ends early where the scores drop below it.")
EFFORT_DOC = ("Search effort: `fast` (a quarter of the tuned nprobe / half the tuned efSearch), `balanced` (the "
              "values tuned at build time, default) or `exact` (every vector scored).")
DIVERSIFY_DOC = ("Crowding: at most `per_group` results per `label`, or per value of a metadata key "
                 "(`meta:KEY`); images without the key are groups of their own.")
PER_GROUP_DOC = "With `diversify`: results allowed per group (>= 1)."
MMR_DOC = ("Re-rank by maximal marginal relevance: LAMBDA in [0, 1], 1 = pure similarity, lower = more "
           "diverse. Scores shown stay the similarity to the query.")


@dataclass(frozen=True)
class Ranking:
    """Per-request ranking options (defaults: a plain top-k)."""

    offset: int = 0
    effort: str = "balanced"
    diversify: str | None = None
    per_group: int = 1
    mmr: float | None = None
    # The deepest page any request may ask for (RETRIEVAL_MAX_K). MMR's greedy picks depend on the candidate
    # pool, so its pool is sized for that page, not this one: every page then comes from one ordering, and
    # "More results" neither repeats nor skips an image.
    deepest: int = 0

    @property
    def reranks(self) -> bool:
        return self.diversify is not None or self.mmr is not None

    def pool_size(self, need: int) -> int:
        if not self.reranks:
            return need
        if self.mmr is not None:
            need = max(need, self.deepest)
        return min(max(need * POOL_FACTOR, POOL_MIN), POOL_MAX)

    def group_key(self) -> Callable[[SearchHit], Any]:
        if self.diversify == "label":
            return lambda hit: ("label", hit.label) if hit.label is not None else ("id", hit.id)
        key = (self.diversify or "").removeprefix("meta:")
        return lambda hit: ("meta", str(hit.metadata[key])) if key in hit.metadata else ("id", hit.id)


def parse_diversify(value: str | None, where: str) -> str | None:
    """'label' or 'meta:KEY', else a 422 naming the field."""
    if value is None or value == "":
        return None
    # Any key a metadata filter can address (everything after 'meta:', as written): grouping reads it in Python.
    if value == "label" or (value.startswith("meta:") and len(value) > len("meta:")):
        return value
    raise ApiError(422, f"diversify must be 'label' or 'meta:KEY' (KEY: a metadata key, as written), "
                        f"not {value!r}", detail=[{"loc": [where, "diversify"], "msg": "invalid value"}])


def crowd(hits: list[SearchHit], per_group: int, key: Callable[[SearchHit], Any]) -> list[SearchHit]:
    """Hits in rank order with at most `per_group` from any one group."""
    counts: dict[Any, int] = {}
    kept = []
    for hit in hits:
        group = key(hit)
        if counts.get(group, 0) < per_group:
            counts[group] = counts.get(group, 0) + 1
            kept.append(hit)
    return kept


def mmr_order(query: np.ndarray, vectors: np.ndarray, lam: float, count: int) -> list[int]:
    """Positions of `count` candidates picked greedily by maximal marginal relevance:
    argmax lam * sim(q, d) - (1 - lam) * max over picked p of sim(d, p)."""
    relevance = vectors @ query
    pairwise = vectors @ vectors.T
    picked: list[int] = []
    redundancy = np.full(len(vectors), -np.inf)
    available = np.ones(len(vectors), dtype=bool)
    for _ in range(min(count, len(vectors))):
        gain = lam * relevance - (1 - lam) * np.where(np.isfinite(redundancy), redundancy, 0.0)
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, pairwise[best])
    return picked


def rocchio(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """The feedback query: POSITIVE_WEIGHT * mean(positives) - NEGATIVE_WEIGHT * mean(negatives), L2-normalised
    (the index scores inner products of unit vectors)."""
    query = POSITIVE_WEIGHT * positives.mean(axis=0)
    if len(negatives):
        query = query - NEGATIVE_WEIGHT * negatives.mean(axis=0)
    norm = float(np.linalg.norm(query))
    return (query / norm if norm > 0 else query).astype(np.float32)
