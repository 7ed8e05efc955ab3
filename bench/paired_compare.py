"""Paired comparison of embedders on the same queries: which differences in R@1 and MAP@R are more than noise.

Two rows of docs/quality.md differ by a few tenths of a point; against R@1's unpaired standard error (about 0.5 on
2,953 queries) that reads as noise. But every row answers the same queries, so the fair test is paired:
- R@1: exact McNemar test on the queries one model gets right at 1 and the other does not;
- MAP@R: per-query average precision at R, its mean difference with a paired bootstrap 95% interval and a sign
  test over the queries where the two differ.

Each model is a preset name or a checkpoint directory, as for `retrieval eval --model`; the first is the baseline
every other one is compared with. Embeddings are cached under --cache, so a re-run of the same models only
scores.

    python bench/paired_compare.py --root /work/shared/data/cub100 --classes 50:100 \\
        --model off_the_shelf=efficientnet_lite012_gem --model irt=runs/x/best --model proxy_anchor=runs/y/best
"""

from __future__ import annotations

import argparse
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.images import file_loader  # noqa: E402
from app.settings import get_settings  # noqa: E402
from models.data import load_eval_items  # noqa: E402
from models.evaluate import embed_items, knn  # noqa: E402


def per_query_scores(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out hit at 1 (bool [N]) and average precision at R (float [N]), R = the query's class size - 1.

    pytorch-metric-learning reports only the mean MAP@R; the paired tests need each query's own value.
    """
    counts = np.bincount(labels)
    r_per_query = counts[labels] - 1
    neighbors = knn(embeddings, embeddings, int(r_per_query.max()), exclude_self=True)
    relevant = labels[neighbors] == labels[:, None]
    hit_at_1 = relevant[:, 0]
    ranks = np.arange(1, relevant.shape[1] + 1)
    within_r = ranks[None, :] <= r_per_query[:, None]
    precision_at_i = np.cumsum(relevant, axis=1) / ranks[None, :]
    ap_at_r = (precision_at_i * relevant * within_r).sum(axis=1) / np.maximum(r_per_query, 1)
    return hit_at_1, ap_at_r


def sign_test_p(only_a: int, only_b: int) -> float:
    """Exact two-sided binomial test of a split against 1/2: McNemar's test when the counts are the discordant
    queries (right in one model only), a sign test when they are the queries each model scores higher."""
    n, fewer = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(fewer + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))  # exact integers: n runs to thousands


def paired_bootstrap_ci(diff: np.ndarray, rounds: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(rounds)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/work/shared/data/cub100")
    parser.add_argument("--classes", default="50:100")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PRESET_OR_CHECKPOINT")
    parser.add_argument(
        "--cache", default="runs/paired_compare", help="embeddings are kept here as NAME.npz, with their provenance"
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"skipped: no dataset at {args.root} (see ../shared/ASSETS.md)")
        return 0
    if any("=" not in spec for spec in args.model):
        parser.error("each --model is NAME=PRESET_OR_CHECKPOINT")
    models = dict(spec.split("=", 1) for spec in args.model)
    if len(models) < 2:
        parser.error("give at least two --model NAME=... to compare")

    items = load_eval_items("cub", args.root, args.classes)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, source in models.items():
        cached = cache / f"{name}.npz"
        # A cached file is reused only for the same model and images: a name reused for another model re-embeds.
        provenance = np.array([source, args.root, args.classes])
        saved = np.load(cached) if cached.exists() else None
        if saved is not None and np.array_equal(saved.get("provenance"), provenance):
            embeddings, labels = saved["embeddings"], saved["labels"]
        else:
            from models.zoo import create_embedder

            embeddings, labels = embed_items(
                create_embedder(source), items, file_loader(get_settings()), num_workers=args.workers
            )
            np.savez(cached, embeddings=embeddings, labels=labels, provenance=provenance)
        scores[name] = per_query_scores(embeddings, labels)

    print(f"{len(items)} queries, leave-one-out, classes {args.classes}\n")
    print("| model | R@1 | right at 1 | MAP@R |")
    print("|---|---|---|---|")
    for name, (hits, ap) in scores.items():
        print(f"| {name} | {100 * hits.mean():.1f} | {int(hits.sum()):,} | {100 * ap.mean():.1f} |")

    base_name, (base_hits, base_ap) = next(iter(scores.items()))
    print(f"\nAgainst {base_name}, paired over the same queries:\n")
    print(
        "| model | R@1 diff | right only here / only in base | McNemar p "
        "| MAP@R diff (95% CI) | MAP@R better / worse | sign p |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (hits, ap) in list(scores.items())[1:]:
        only_here, only_base = int((hits & ~base_hits).sum()), int((base_hits & ~hits).sum())
        diff = ap - base_ap
        low, high = paired_bootstrap_ci(diff)
        better, worse = int((diff > 0).sum()), int((diff < 0).sum())
        print(
            f"| {name} | {100 * (hits.mean() - base_hits.mean()):+.1f} | {only_here} / {only_base} "
            f"| {sign_test_p(only_here, only_base):.3g} "
            f"| {100 * diff.mean():+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) "
            f"| {better} / {worse} | {sign_test_p(better, worse):.3g} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
