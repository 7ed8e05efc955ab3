"""Metric-learning losses, selectable by name from a training config.

From pytorch-metric-learning (PML): contrastive (+ cross-batch memory), triplet with a miner, N-pair, SoftTriple,
Proxy-NCA, Proxy-Anchor, multi-similarity. Written here because PML lacks them: the KoLeo differential-entropy
regulariser (IRT), the ABE divergence loss, the MAMC N-pair groups and the log-ratio loss for graded (continuous)
labels (seed 004; see /work/shared/PAPERS.md).

`build_loss(config, embedding_size, num_classes, num_parts)` returns a `RetrievalLoss`, which takes the model's
outputs (the ensemble embedding and, for ABE/OSME, the per-learner embeddings) and returns the total loss and
its named terms for logging.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners, reducers
from torch import nn


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: -mean_i log(min_{j != i} ||f_i - f_j|| + eps)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings.float(), dim=-1)
        with torch.no_grad():
            # The nearest neighbour on the sphere is the one with the largest cosine similarity.
            sims = x @ x.t()
            sims.fill_diagonal_(-2.0)
            nearest = sims.argmax(dim=1)
        # PairwiseDistance's eps keeps the gradient finite when two embeddings coincide.
        dist = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
        return -torch.log(dist + self.eps).mean()


class ABEDivergenceLoss(nn.Module):
    """ABE: mean over images of sum over ordered learner pairs p != q of [m_div - ||B_p(x) - B_q(x)||^2]+ ."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        # parts: [B, M, d], one embedding per learner.
        parts = parts.float()
        sq_dist = torch.cdist(parts, parts).pow(2)  # [B, M, M]
        off_diag = ~torch.eye(parts.shape[1], dtype=torch.bool, device=parts.device)
        return F.relu(self.margin - sq_dist)[:, off_diag].sum(dim=1).mean()


def _npair_over_masks(sims: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """N-pair: mean over anchors of sum_{p in P} log(1 + sum_{n in N} exp(s_an - s_ap))."""
    neg_lse = torch.logsumexp(sims.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    per_pair = F.softplus(neg_lse - sims)  # log(1 + exp(lse_n - s_ap)) = log(1 + sum_n exp(s_an - s_ap))
    per_anchor = (per_pair * positive).sum(dim=1)
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not valid.any():
        return sims.new_zeros(())
    return per_anchor[valid].mean()


class MAMCLoss(nn.Module):
    """MAMC (Sun et al. 2018): N-pair over SASC / SADC / DASC groups of the part features, plus softmax.

    For an anchor f_i^p: SASC = same attention p, same class (other images); SADC = same attention, other class;
    DASC = other attention, same class (the same image included); DADC = other attention, other class.
    Positives vs negatives: SASC vs the rest; SADC vs DADC; DASC vs DADC.
    """

    def __init__(self, num_classes: int, embedding_size: int, lambda_: float = 0.5, softmax: bool = True) -> None:
        super().__init__()
        self.lambda_ = lambda_
        self.classifier = nn.Linear(embedding_size, num_classes) if softmax and num_classes > 0 else None

    def group_terms(self, parts: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        b, p, d = parts.shape
        feats = parts.float().reshape(b * p, d)
        image = torch.arange(b, device=parts.device).repeat_interleave(p)
        attention = torch.arange(p, device=parts.device).repeat(b)
        label = labels.repeat_interleave(p)
        same_att = attention[:, None] == attention[None, :]
        same_cls = label[:, None] == label[None, :]
        not_self = ~(image[:, None] == image[None, :]) | ~same_att
        sasc = same_att & same_cls & not_self
        sadc = same_att & ~same_cls
        dasc = ~same_att & same_cls
        dadc = ~same_att & ~same_cls
        sims = feats @ feats.t()
        return {
            "sasc": _npair_over_masks(sims, sasc, sadc | dasc | dadc),
            "sadc": _npair_over_masks(sims, sadc, dadc),
            "dasc": _npair_over_masks(sims, dasc, dadc),
        }

    def forward(self, parts: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.group_terms(parts, labels)
        out = {"mamc": self.lambda_ * (terms["sasc"] + terms["sadc"] + terms["dasc"])}
        if self.classifier is not None:
            logits = self.classifier(parts.float().flatten(1))
            out["softmax"] = F.cross_entropy(logits, labels)
        return out


class LogRatioLoss(nn.Module):
    """Log-ratio loss (Kim et al. 2019, "Deep metric learning beyond binary supervision") for graded labels.

    For every anchor a and every pair of other batch members i != j: (log(D(f_a,f_i) / D(f_a,f_j)) -
    log(D(y_a,y_i) / D(y_a,y_j)))^2, averaged over all such triplets (the paper's dense triplets; here every batch
    member is an anchor in turn). D(f) is the squared Euclidean distance of the embeddings, D(y) the Euclidean
    distance of the labels (a number or a vector per image); `eps` keeps both logs finite for equal labels.
    Ratios, not distances, are matched, so the embedding's scale is free and only the label's geometry matters.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Any = None) -> torch.Tensor:
        x = embeddings.float()
        y = labels.float().reshape(len(x), -1)
        # Explicit differences rather than cdist: cdist's gradient is NaN at the zero diagonal.
        emb_dist = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
        label_dist = (y[:, None, :] - y[None, :, :]).pow(2).sum(-1).sqrt()
        log_ratio_gap = torch.log(emb_dist + self.eps) - torch.log(label_dist + self.eps)  # [a, i]
        per_triplet = (log_ratio_gap[:, :, None] - log_ratio_gap[:, None, :]).pow(2)  # [a, i, j]
        n = len(x)
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        valid = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])  # a, i, j all different
        if not valid.any():
            return x.sum() * 0.0
        return per_triplet[valid].mean()


@dataclass
class LossConfig:
    """The `loss:` section of a training config."""

    name: str = "contrastive_xbm"
    pos_margin: float = 1.0  # contrastive on cosine similarity: positives pulled to 1
    neg_margin: float = 0.5  # negatives pushed below 0.5
    memory_size: int = 4096  # cross-batch memory (XBM) queue length
    # "mean_nonzero": PML's default (mean over the pairs with a non-zero loss); "sum_per_anchor": the IRT paper's
    # 1/B sum_i sum_j, which weighs the contrastive term far more heavily against KoLeo.
    reduction: str = "mean_nonzero"
    koleo: float = 0.0  # lambda of the KoLeo regulariser (IRT: 0.7)
    divergence: float = 0.0  # lambda_div of the ABE divergence loss (ABE: 1)
    div_margin: float = 1.0  # m_div
    per_learner: bool = True  # ABE/OSME: apply the metric loss to each learner (sum_m L(B_m))
    triplet_margin: float = 0.1
    mamc_lambda: float = 0.5
    softtriple_centers: int = 10
    proxy_alpha: float = 32.0
    proxy_margin: float = 0.1
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    # log_ratio: the image metadata key holding each image's graded label (worker train jobs), the number of
    # label-space nearest neighbours of the batch's anchor in each batch (dense sampling), and the log's epsilon.
    label_key: str | None = None
    neighbors: int = 5
    log_ratio_eps: float = 1e-6

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LossConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown loss options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


METRIC_LOSSES = (
    "contrastive",
    "contrastive_xbm",
    "triplet",
    "npair",
    "softtriple",
    "proxy_nca",
    "proxy_anchor",
    "multi_similarity",
    "mamc",
    "log_ratio",
)
GRADED_LOSSES = ("log_ratio",)  # labels are numbers (or vectors) whose distances matter, not class ids


def build_metric_loss(config: LossConfig, embedding_size: int, num_classes: int) -> tuple[nn.Module, Any]:
    """A PML loss (and miner, or None) by name."""
    cosine = distances.CosineSimilarity()
    name = config.name
    if name in ("contrastive", "contrastive_xbm"):
        if config.reduction not in ("mean_nonzero", "sum_per_anchor"):
            raise ValueError(f"reduction must be 'mean_nonzero' or 'sum_per_anchor', not {config.reduction!r}")
        reducer = reducers.SumReducer() if config.reduction == "sum_per_anchor" else reducers.AvgNonZeroReducer()
        loss = losses.ContrastiveLoss(
            pos_margin=config.pos_margin, neg_margin=config.neg_margin, distance=cosine, reducer=reducer
        )
        if name == "contrastive_xbm":
            loss = losses.CrossBatchMemory(loss, embedding_size, memory_size=config.memory_size)
        return loss, None
    if name == "triplet":
        miner = miners.TripletMarginMiner(margin=config.triplet_margin, type_of_triplets="semihard", distance=cosine)
        return losses.TripletMarginLoss(margin=config.triplet_margin, distance=cosine), miner
    if name == "npair":
        return losses.NPairsLoss(), None
    if name == "softtriple":
        return losses.SoftTripleLoss(num_classes, embedding_size, centers_per_class=config.softtriple_centers), None
    if name == "proxy_nca":
        return losses.ProxyNCALoss(num_classes, embedding_size), None
    if name == "proxy_anchor":
        return (
            losses.ProxyAnchorLoss(num_classes, embedding_size, margin=config.proxy_margin, alpha=config.proxy_alpha),
            None,
        )
    if name == "log_ratio":
        return LogRatioLoss(config.log_ratio_eps), None
    if name == "multi_similarity":
        miner = miners.MultiSimilarityMiner(epsilon=0.1)
        return losses.MultiSimilarityLoss(alpha=config.ms_alpha, beta=config.ms_beta, base=config.ms_base), miner
    raise ValueError(f"unknown loss {name!r}; known: {METRIC_LOSSES}")


class RetrievalLoss(nn.Module):
    """Metric loss (on the ensemble, or per learner) + KoLeo + ABE divergence, or MAMC; returns named terms."""

    def __init__(self, config: LossConfig, embedding_size: int, num_classes: int, num_parts: int = 0) -> None:
        super().__init__()
        self.config = config
        self.num_parts = num_parts
        # Graded labels constrain the whole descriptor's distances: the ensemble, not each learner, carries them.
        self.per_learner = bool(num_parts) and config.per_learner and config.name not in ("mamc", *GRADED_LOSSES)
        self.mamc: MAMCLoss | None = None
        self.miner = None
        if config.name == "mamc":
            if not num_parts:
                raise ValueError("the MAMC loss needs an embedder with parts (osme or abe)")
            self.mamc = MAMCLoss(num_classes, embedding_size, lambda_=config.mamc_lambda)
            self.metric = nn.ModuleList()
        elif self.per_learner:
            metric, self.miner = build_metric_loss(config, embedding_size // num_parts, num_classes)
            # One loss (and one XBM queue, one set of proxies) per learner.
            self.metric = nn.ModuleList([metric] + [copy.deepcopy(metric) for _ in range(num_parts - 1)])
        else:
            metric, self.miner = build_metric_loss(config, embedding_size, num_classes)
            self.metric = nn.ModuleList([metric])
        self.koleo = KoLeoLoss() if config.koleo > 0 else None
        self.divergence = ABEDivergenceLoss(config.div_margin) if config.divergence > 0 else None

    def _metric(self, loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        value = loss(embeddings, labels, indices)
        if self.config.reduction == "sum_per_anchor" and self.config.name.startswith("contrastive"):
            value = value / embeddings.shape[0]  # the batch's images are the anchors
        return value

    def forward(
        self, embedding: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        embedding = embedding.float()
        terms: dict[str, torch.Tensor] = {}
        if self.mamc is not None:
            assert parts is not None
            terms.update(self.mamc(parts, labels))
        elif self.per_learner:
            assert parts is not None
            parts_f = parts.float()
            terms["metric"] = sum(self._metric(m, parts_f[:, i], labels) for i, m in enumerate(self.metric))
        else:
            terms["metric"] = self._metric(self.metric[0], embedding, labels)
        if self.koleo is not None:
            terms["koleo"] = self.config.koleo * self.koleo(embedding)
        if self.divergence is not None:
            assert parts is not None, "the divergence loss needs per-learner embeddings"
            terms["divergence"] = self.config.divergence * self.divergence(parts)
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def memory_state(self) -> list[dict[str, Any]]:
        """XBM queue positions, which are plain attributes and so not in state_dict()."""
        return [
            {"queue_idx": m.queue_idx, "has_been_filled": m.has_been_filled}
            for m in self.metric
            if isinstance(m, losses.CrossBatchMemory)
        ]

    def load_memory_state(self, state: list[dict[str, Any]]) -> None:
        queues = [m for m in self.metric if isinstance(m, losses.CrossBatchMemory)]
        for m, s in zip(queues, state, strict=True):
            m.queue_idx, m.has_been_filled = s["queue_idx"], s["has_been_filled"]


def build_loss(
    config: LossConfig | dict[str, Any], embedding_size: int, num_classes: int, num_parts: int = 0
) -> RetrievalLoss:
    if not isinstance(config, LossConfig):
        config = LossConfig.from_dict(config)
    return RetrievalLoss(config, embedding_size, num_classes, num_parts)


__all__ = [
    "ABEDivergenceLoss",
    "KoLeoLoss",
    "GRADED_LOSSES",
    "LogRatioLoss",
    "LossConfig",
    "MAMCLoss",
    "METRIC_LOSSES",
    "RetrievalLoss",
    "build_loss",
    "build_metric_loss",
]
