"""bench/paired_compare.py: its per-query scores must average to the evaluator's own R@1 and MAP@R."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from paired_compare import per_query_scores, sign_test_p  # noqa: E402

from models.evaluate import evaluate_embeddings  # noqa: E402


def test_per_query_scores_average_to_the_evaluators_recall_and_map_at_r():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 300).astype(np.int64)
    class_directions = rng.normal(size=(7, 16))
    embeddings = (rng.normal(size=(300, 16)) + 0.8 * class_directions[labels]).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)

    hit_at_1, ap_at_r = per_query_scores(embeddings, labels)
    expected = evaluate_embeddings(embeddings, labels)

    assert hit_at_1.shape == ap_at_r.shape == (300,)
    assert hit_at_1.mean() == expected["recall@1"]
    assert np.isclose(ap_at_r.mean(), expected["map@r"], atol=1e-9)
    assert 0.0 < expected["map@r"] < 1.0  # neither trivial nor random


def test_sign_test_is_symmetric_and_neutral_without_discordant_queries():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(122, 93) == sign_test_p(93, 122)
    assert sign_test_p(30, 5) < 0.001 < sign_test_p(20, 15)
