"""Filtered search keeps working in a process that also evaluates models (the worker does both).

pytorch-metric-learning imports faiss.contrib.torch_utils, which swaps every faiss Index.search in the process
for a wrapper without the `params` argument that filtered and tuned searches need.
"""

from __future__ import annotations

import numpy as np

from index.vector_index import VectorIndex


def test_filtered_search_after_pml_import() -> None:
    import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401 - the import is the point

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for factory in ("Flat", "HNSW16"):
        index = VectorIndex(32, factory)
        index.add(np.arange(1, 201), vectors)
        allowed = np.array([3, 50, 77, 120, 199])
        scores, ids = index.search(vectors[:4], 5, allowed_ids=allowed)
        assert set(ids.ravel().tolist()) <= set(allowed.tolist())
        assert (ids >= 0).all() and np.isfinite(scores).all()
