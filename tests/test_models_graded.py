"""The log-ratio loss for graded labels: hand-computed values, gradients, dense batches, ranking metrics, and a tiny
graded task learned end to end (Spearman of distances up) on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.images import read_image_file
from models.graded import graded_batches, graded_metrics, graded_splits, random_split
from models.losses import LogRatioLoss, build_loss
from models.train import run_config, train
from tests.test_models_train import tiny_config


def test_log_ratio_matches_hand_computation() -> None:
    # 1-d embeddings 0, 1, 3 (squared distances 1, 9, 4) and labels 0, 1, 2 (distances 1, 2, 1).
    # Anchor 0: log(1/9) - log(1/2) = -log 4.5;  anchor 1: log(1/4) - log(1/1) = -log 4;
    # anchor 2: log(9/4) - log(2/1) = log(9/8). Each (i, j) pair appears in both orders, same square.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    y = torch.tensor([0.0, 1.0, 2.0])
    expected = (math.log(4.5) ** 2 + math.log(4) ** 2 + math.log(9 / 8) ** 2) / 3
    assert LogRatioLoss(eps=0.0)(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert LogRatioLoss()(x, y).item() == pytest.approx(expected, rel=1e-4)


def test_log_ratio_is_zero_when_ratios_match_and_ignores_scale() -> None:
    # Squared embedding distances proportional to label distances: 1-d labels 0, 1, 3 and points on a line at
    # sqrt of nothing simpler than 2-d vectors with |f_i - f_j|^2 = c |y_i - y_j| for three points.
    y = torch.tensor([0.0, 1.0, 2.0])
    # |f0-f1|^2 = 1, |f1-f2|^2 = 1, |f0-f2|^2 = 2: a right angle at f1.
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert LogRatioLoss(eps=0.0)(f, y).item() == pytest.approx(0.0, abs=1e-10)
    torch.manual_seed(0)
    x, labels = torch.randn(6, 4), torch.rand(6)
    assert LogRatioLoss(eps=0.0)(3 * x, labels).item() == pytest.approx(LogRatioLoss(eps=0.0)(x, labels).item())


def test_log_ratio_gradients_flow_and_stay_finite() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    x[1] = x[0]  # two identical embeddings and two identical labels: the eps keeps both logs finite
    x.requires_grad_(True)
    y = torch.rand(8)
    y[3] = y[2]
    loss = build_loss({"name": "log_ratio"}, embedding_size=16, num_classes=0)
    total, terms = loss(torch.nn.functional.normalize(x, dim=-1), y)
    total.backward()
    assert "metric" in terms and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dense_batches_put_the_anchors_label_neighbours_first() -> None:
    values = [float(v) for v in range(100)]
    batches = graded_batches(values, batch_size=10, neighbors=4, num_batches=20, seed=3)
    assert batches == graded_batches(values, 10, 4, 20, seed=3)  # resume regenerates them
    for batch in batches:
        anchor, nearest = batch[0], batch[1:5]
        assert len(set(batch)) == 10
        assert max(abs(values[i] - values[anchor]) for i in nearest) <= 4


def test_graded_metrics_by_hand() -> None:
    # Points on a circle arc at their label's angle (no ties): distances rank as label distances do, so
    # Spearman 1 and nDCG 1.
    angles = np.array([0.0, 0.07, 0.23, 0.52, 1.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    perfect = graded_metrics(emb, angles)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["ndcg@10"] == pytest.approx(1.0)
    # Labels unrelated to the geometry score lower.
    shuffled = graded_metrics(emb, angles[[2, 0, 4, 1, 3]])
    assert shuffled["spearman"] < 0.5 and shuffled["ndcg@10"] < 1.0


def make_graded_images(root: Path, count: int = 48, size: int = 32) -> list[tuple[str, float]]:
    """The graded label is the height of a horizontal bright bar (0: top, 1: bottom; training's mirror flips keep
    it), on a background of random colour and noise that has nothing to do with it."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        position = float(rng.uniform(0, 1))
        img = rng.uniform(0.0, 0.6, 3) + rng.normal(0, 0.1, (size, size, 3))
        top = int(round(position * (size - 6)))
        img[top : top + 6, :] = 1.0
        path = root / f"{i}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        items.append((str(path), position))
    return items


def test_a_tiny_graded_task_is_learned(tmp_path) -> None:
    items = make_graded_images(tmp_path / "img")
    config = tiny_config(
        loss={"name": "log_ratio", "neighbors": 4}, steps=30, batch_size=12, eval_every=30, lr=1e-3, head_lr=3e-3
    )
    result = train(config, items, items, tmp_path / "run", read_image_file, device="cpu")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = [e for e in log if e["event"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 30
    print("spearman", val[0]["spearman"], "->", val[-1]["spearman"])
    assert val[-1]["spearman"] > val[0]["spearman"] + 0.1, (val[0], val[-1])
    assert result.metrics["spearman"] == max(v["spearman"] for v in val)  # best checkpoint chosen by Spearman


def test_a_training_config_with_graded_csv_labels(tmp_path) -> None:
    items = make_graded_images(tmp_path / "img", count=24)
    manifest = tmp_path / "levels.csv"
    manifest.write_text("path,grey\n" + "".join(f"{Path(p).name},{v}\n" for p, v in items))
    data = {"graded": True, "csv": str(manifest), "root": str(tmp_path / "img"), "label_column": "grey",
            "val_fraction": 0.25, "test_fraction": 0.25}
    train_items, val_items, test_items = graded_splits(data)
    assert (len(train_items), len(val_items), len(test_items)) == (14, 4, 6)
    assert dict(items) == dict(train_items + val_items + test_items)
    config = tiny_config(loss={"name": "log_ratio"}, data=data, steps=2, batch_size=8, eval_every=2)
    summary = run_config(config, tmp_path / "run", read_image_file, device="cpu")
    assert set(summary["test"]) == {"spearman", "ndcg@10"} and "spearman" in summary["val"]
    assert random_split(items, 0.5, seed=1) == random_split(items, 0.5, seed=1)
