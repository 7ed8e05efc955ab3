"""Hand-written losses (KoLeo, ABE divergence, MAMC) against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import METRIC_LOSSES, ABEDivergenceLoss, KoLeoLoss, LossConfig, MAMCLoss, build_loss


def test_koleo_matches_hand_computation() -> None:
    # Three unit vectors: e1, e2 and (e1 + e2)/sqrt2. Nearest neighbours: e1 <-> d, e2 <-> d, d <-> e1 (tie e2).
    d = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    x = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), d])
    near = math.sqrt(2 - math.sqrt(2))  # ||e1 - d|| = sqrt(2 - 2 cos 45deg)
    expected = -(3 * math.log(near)) / 3
    assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_gradient_spreads_points() -> None:
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], requires_grad=True)
    KoLeoLoss()(x).backward()
    # Descending the loss moves the two close points apart: their gradients point towards each other.
    step = -x.grad
    assert (step[0] - step[1])[1] < 0  # point 0 moves down in y, point 1 up


def test_abe_divergence_matches_hand_computation() -> None:
    # One image, three learners: p0 = (1,0), p1 = (0.6,0.8), p2 = (1,0). ||p0-p1||^2 = 0.8, ||p0-p2||^2 = 0,
    # ||p1-p2||^2 = 0.8. Hinge [1 - d]+ over ordered pairs: 2 * (0.2 + 1.0 + 0.2) = 2.8.
    parts = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]]])
    assert ABEDivergenceLoss(margin=1.0)(parts).item() == pytest.approx(2.8, rel=1e-5)
    # Far-apart learners (squared distance 2 > m_div) cost nothing; the loss averages over images.
    far = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    both = torch.cat([parts[:, :2], far])
    assert ABEDivergenceLoss(margin=1.0)(both).item() == pytest.approx((2 * 0.2 + 0.0) / 2, rel=1e-5)


def _npair(anchor: torch.Tensor, positives: list[torch.Tensor], negatives: list[torch.Tensor]) -> float:
    total = 0.0
    for pos in positives:
        total += math.log(1 + sum(math.exp(float(anchor @ n - anchor @ pos)) for n in negatives))
    return total


def test_mamc_groups_match_hand_computation() -> None:
    # Two images of class 0, one of class 1; two attentions. Features chosen by hand.
    torch.manual_seed(0)
    parts = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
    labels = torch.tensor([0, 0, 1])
    loss = MAMCLoss(num_classes=0, embedding_size=8, lambda_=1.0, softmax=False)
    terms = loss.group_terms(parts, labels)
    f = parts
    sasc, sadc, dasc = [], [], []
    for i in range(3):
        for p in range(2):
            a = f[i, p]
            same_att = [(j, p) for j in range(3) if j != i]
            other_att = [(j, 1 - p) for j in range(3)]
            g_sasc = [f[j, q] for j, q in same_att if labels[j] == labels[i]]
            g_sadc = [f[j, q] for j, q in same_att if labels[j] != labels[i]]
            g_dasc = [f[j, q] for j, q in other_att if labels[j] == labels[i]]
            g_dadc = [f[j, q] for j, q in other_att if labels[j] != labels[i]]
            if g_sasc and (g_sadc + g_dasc + g_dadc):
                sasc.append(_npair(a, g_sasc, g_sadc + g_dasc + g_dadc))
            if g_sadc and g_dadc:
                sadc.append(_npair(a, g_sadc, g_dadc))
            if g_dasc and g_dadc:
                dasc.append(_npair(a, g_dasc, g_dadc))
    assert terms["sasc"].item() == pytest.approx(sum(sasc) / len(sasc), rel=1e-5)
    assert terms["sadc"].item() == pytest.approx(sum(sadc) / len(sadc), rel=1e-5)
    assert terms["dasc"].item() == pytest.approx(sum(dasc) / len(dasc), rel=1e-5)


def test_mamc_adds_softmax_term() -> None:
    parts = torch.nn.functional.normalize(torch.randn(4, 2, 3), dim=-1)
    out = MAMCLoss(num_classes=2, embedding_size=6)(parts, torch.tensor([0, 0, 1, 1]))
    assert set(out) == {"mamc", "softmax"} and all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("name", [n for n in METRIC_LOSSES if n != "mamc"])
def test_every_named_loss_builds_and_backpropagates(name: str) -> None:
    loss = build_loss({"name": name, "memory_size": 32, "koleo": 0.7}, embedding_size=8, num_classes=4)
    emb = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1).requires_grad_()
    total, terms = loss(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    total.backward()
    assert "metric" in terms and "koleo" in terms and emb.grad is not None and torch.isfinite(total)


def test_contrastive_sum_per_anchor_matches_paper_formula() -> None:
    # No memory, 4 points: L = 1/B sum_i [sum_pos (1 - s) + sum_neg [s - 0.5]+].
    emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    loss = build_loss(LossConfig(name="contrastive", reduction="sum_per_anchor"), 3, 2)
    total, _ = loss(emb, labels)
    s = emb @ emb.t()
    expected = 0.0
    for i in range(4):
        for j in range(4):
            if i != j:
                expected += (1 - s[i, j]).item() if labels[i] == labels[j] else max(s[i, j].item() - 0.5, 0.0)
    assert total.item() == pytest.approx(expected / 4, rel=1e-4)


def test_unknown_loss_options_are_rejected() -> None:
    with pytest.raises(ValueError):
        LossConfig.from_dict({"name": "contrastive", "margin_typo": 1})
    with pytest.raises(ValueError):
        build_loss({"name": "nope"}, 8, 2)
