"""Training asks each embedder for its trunk, its parts and its extra losses: nothing is guessed from names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from app.images import read_image_file
from models.config import TrainConfig
from models.embedder import Embedder, EmbedderConfig, register
from models.losses import build_loss
from models.optim import optimizer_groups, set_train_mode
from models.pretrained import create_backbone
from models.train import TrainingModel, train
from models.zoo import create_embedder
from tests.test_models_train import make_images

REPO = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(lr=1e-3, head_lr=None, loss_lr=None)  # head 10 x lr, loss 100 x lr


def _config(arch: str, backbone: str = "resnet10t", dim: int = 32, **extra) -> EmbedderConfig:
    return EmbedderConfig(arch=arch, backbone=backbone, dim=dim, image_size=32, resize_size=36, extra=extra)


EXISTING_ARCHS = {
    "timm": _config("timm"),
    "irt": _config("irt", projection="linear"),
    "abe": _config("abe", num_learners=2),
    "osme": _config("osme", num_parts=2),
    "ensemble": _config("ensemble", "resnet10t+resnet10t", dim=1024),
}


def _lr_by_name(embedder: Embedder, loss: nn.Module) -> dict[str, float]:
    names = {id(p): f"embedder.{n}" for n, p in embedder.named_parameters()}
    names.update({id(p): f"loss.{n}" for n, p in loss.named_parameters()})
    return {names[id(p)]: group["lr"] for group in optimizer_groups(embedder, loss, CONFIG) for p in group["params"]}


@pytest.mark.parametrize("arch", sorted(EXISTING_ARCHS))
def test_existing_archs_keep_the_learning_rate_of_every_parameter(arch: str) -> None:
    """The rule the hooks replace (trunk = parameters under backbone., backbones. or trunk.) gave these rates."""
    embedder = create_embedder(EXISTING_ARCHS[arch])
    loss = build_loss({"name": "proxy_anchor"} if arch != "osme" else {"name": "mamc"}, embedder.dim, 4,
                      embedder.num_parts)
    before = {f"embedder.{n}": CONFIG.lr if n.startswith(("backbone.", "backbones.", "trunk.")) else 10 * CONFIG.lr
              for n, _ in embedder.named_parameters()}
    before.update({f"loss.{n}": 100 * CONFIG.lr for n, _ in loss.named_parameters()})
    assert _lr_by_name(embedder, loss) == before
    assert {CONFIG.lr, 100 * CONFIG.lr} <= set(before.values())  # a trunk and a loss group (heads: not ensemble)


class RenamedTrunk(Embedder):
    """A pretrained trunk under a name no prefix list knew, plus a new projection."""

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config)
        self.encoder = create_backbone(config.backbone, config.pretrained)
        self.projection = nn.Linear(self.encoder.num_features, config.dim)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder.forward_features(pixels).mean(dim=(2, 3))
        return nn.functional.normalize(self.projection(pooled), dim=-1)


def test_a_trunk_under_another_name_trains_at_the_backbone_rate_with_frozen_batchnorm() -> None:
    embedder = RenamedTrunk(_config("renamed"))
    loss = build_loss({"name": "contrastive"}, embedder.dim, 4)
    lrs = _lr_by_name(embedder, loss)
    trunk = {name: lr for name, lr in lrs.items() if name.startswith("embedder.encoder.")}
    assert trunk and set(trunk.values()) == {CONFIG.lr}  # not 10x: the old prefix rule gave it the head's rate
    assert {lrs["embedder.projection.weight"], lrs["embedder.projection.bias"]} == {10 * CONFIG.lr}
    set_train_mode(TrainingModel(embedder, loss, amp=False), embedder, freeze_bn=True)
    norms = [m for m in embedder.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and embedder.projection.training


def test_an_embedder_that_does_not_name_its_trunk_cannot_be_trained() -> None:
    class Undeclared(Embedder):
        def __init__(self, config: EmbedderConfig) -> None:
            super().__init__(config)
            self.layer = nn.Linear(3, config.dim)

    with pytest.raises(NotImplementedError, match="backbone_modules"):
        optimizer_groups(Undeclared(_config("undeclared")), nn.Module(), CONFIG)


@register("test_with_extra_loss")
class WithExtraLoss(RenamedTrunk):
    def extra_losses(self, embedding: torch.Tensor, parts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"spread": 0.5 * embedding.mean(dim=0).pow(2).sum()}


def test_an_archs_extra_loss_is_trained_and_logged(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", per_class=4)
    embedder = {"arch": "test_with_extra_loss", "backbone": "resnet10t", "dim": 16, "image_size": 32,
                "resize_size": 36}
    config = TrainConfig.from_dict(dict(embedder=embedder, loss={"name": "contrastive"}, steps=2, batch_size=8,
                                        m_per_class=4, warmup_steps=1, num_workers=0, log_every=1, amp=False,
                                        eval_at_start=False, ks=[1]))
    train(config, images, [], tmp_path / "run", read_image_file, device="cpu")
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in steps if entry["event"] == "train"]
    assert len(steps) == 2
    for entry in steps:
        assert entry["spread"] > 0
        assert entry["loss"] == pytest.approx(entry["metric"] + entry["spread"], rel=1e-5)


def _module_imports(path: Path) -> set[str]:
    """Modules a file imports (top-level and inside functions), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_models_has_no_import_cycle_and_never_imports_app_or_index() -> None:
    modules = {f"models.{p.stem}": p for p in (REPO / "models").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    for name, path in modules.items():
        outside = {m for m in _module_imports(path) if m.split(".")[0] in ("app", "index")}
        assert not outside, f"{name} imports {outside}"

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    for name in sorted(graph):
        assert cycle_from(name, name, (name,)) is None, " -> ".join(cycle_from(name, name, (name,)))
