"""IRT / ABE-M / OSME embedders: shapes, weight sources, gradients, divergence, checkpoint round trips."""

from __future__ import annotations

import pytest
import timm
import torch

from models.abe import ABEEmbedder
from models.checkpoint import load_checkpoint, save_checkpoint
from models.embedder import EmbedderConfig
from models.irt import IRTEmbedder
from models.losses import ABEDivergenceLoss
from models.osme import OSMEEmbedder
from models.zoo import create_embedder

SIZE = 64


def _config(arch: str, backbone: str = "resnet10t", dim: int = 64, **kwargs) -> EmbedderConfig:
    return EmbedderConfig(arch=arch, backbone=backbone, dim=dim, image_size=SIZE, resize_size=72, **kwargs)


def _vit_config(pooling: str = "cls", **extra) -> EmbedderConfig:
    extra = {"backbone_kwargs": {"img_size": SIZE}, **extra}
    return _config("irt", "vit_tiny_patch16_224", dim=192, pooling=pooling, extra=extra)


@pytest.mark.parametrize("pooling", ["cls", "mean", "gem"])
def test_irt_vit_outputs_unit_vectors(pooling: str) -> None:
    model = create_embedder(_vit_config(pooling)).eval()
    out = model(torch.randn(3, 3, SIZE, SIZE))
    assert out.shape == (3, 192)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_irt_loads_a_local_state_dict(tmp_path) -> None:
    # The file a user would download: a timm ViT's own state dict, head included.
    source = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, num_classes=10)
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.state_dict(), path)
    config = _vit_config()
    config.pretrained = str(path)
    model = create_embedder(config).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(source.forward_features(pixels)[:, 0], dim=-1)
        assert torch.allclose(model(pixels), expected, atol=1e-5)


def test_irt_projection_linear_and_pca() -> None:
    linear = create_embedder(_config("irt", dim=16, extra={"projection": "linear"})).eval()
    assert linear(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 16)
    pca = create_embedder(_config("irt", dim=8, extra={"projection": "pca"}))
    assert isinstance(pca, IRTEmbedder)
    pca.fit_pca(torch.randn(20, 3, SIZE, SIZE))
    out = pca.eval()(torch.randn(4, 3, SIZE, SIZE))
    assert out.shape == (4, 8) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError):
        create_embedder(_config("irt", dim=16, extra={"projection": "none"}))


@pytest.mark.parametrize("backbone", ["resnet10t", "tf_efficientnet_lite0", "resnet50", "convnext_atto"])
def test_abe_masks_have_the_shape_of_s_and_gradients_reach_everything(backbone: str) -> None:
    model = create_embedder(_config("abe", backbone, dim=32, extra={"num_learners": 4}))
    assert isinstance(model, ABEEmbedder)
    pixels = torch.randn(4, 3, SIZE, SIZE)
    fmap = model.spatial(pixels)
    masks = model.attention_masks(fmap)
    assert masks.shape == (4, 4, *fmap.shape[1:])
    parts = model.forward_parts(pixels)
    assert parts.shape == (4, 4, 8)
    (parts.sum() + ABEDivergenceLoss()(parts)).backward()
    first_trunk_param = next(p for n, p in model.trunk.named_parameters() if n.startswith(model.spatial_names[0]))
    assert first_trunk_param.grad is not None and first_trunk_param.grad.abs().sum() > 0
    for attention in model.attention:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention.parameters())
    out = model.eval()(pixels)
    assert out.shape == (4, 32) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


def test_abe_learners_move_apart_after_a_divergence_step() -> None:
    torch.manual_seed(0)
    model = create_embedder(_config("abe", dim=32, extra={"num_learners": 4}))
    pixels = torch.randn(8, 3, SIZE, SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    divergence = ABEDivergenceLoss(margin=1.0)
    model.eval()  # fixed BN statistics: compare the same function before and after
    with torch.no_grad():
        before = divergence(model.forward_parts(pixels)).item()
    optimizer.zero_grad()
    divergence(model.forward_parts(pixels)).backward()
    optimizer.step()
    with torch.no_grad():
        parts = model.forward_parts(pixels)
        after = divergence(parts).item()
    assert after < before - 0.1  # near-identical learners at init (masks start near 1), apart after one step
    # Distinct learners: no two give the same embedding of an image.
    dists = torch.cdist(parts, parts)
    off_diag = ~torch.eye(4, dtype=torch.bool)
    assert dists[:, off_diag].min() > 1e-3


def test_abe_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        create_embedder(_config("abe", dim=30, extra={"num_learners": 4}))
    with pytest.raises(ValueError):
        create_embedder(_config("abe", dim=32, extra={"split_stage": 3}))  # resnet: the last stage leaves no G


def test_osme_parts_and_gradients() -> None:
    model = create_embedder(_config("osme", dim=32, extra={"num_parts": 2}))
    assert isinstance(model, OSMEEmbedder)
    parts = model.forward_parts(torch.randn(3, 3, SIZE, SIZE))
    assert parts.shape == (3, 2, 16)
    parts.sum().backward()
    for excitation in model.excitations:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in excitation.parameters())


def test_flip_average_gives_a_mirror_invariant_embedding_in_eval_only() -> None:
    model = create_embedder(_config("irt", dim=16, extra={"projection": "linear"}, flip_average=True)).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), model(pixels.flip(-1)))
        assert model(pixels).shape == (2, 16)
        model.train()
        assert not torch.allclose(model(pixels), model(pixels.flip(-1)))


def test_ensemble_weighs_every_trunk_equally_and_checks_its_options() -> None:
    model = create_embedder(_config("ensemble", backbone="resnet10t+resnet10t", dim=1024)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, SIZE, SIZE))
    assert out.shape == (3, 1024)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out[:, :512].norm(dim=1), out[:, 512:].norm(dim=1))  # each half is 1/sqrt(2)
    with pytest.raises(ValueError, match="at least two trunks"):
        create_embedder(_config("ensemble", dim=512))
    with pytest.raises(ValueError, match="sum of the trunk widths"):
        create_embedder(_config("ensemble", backbone="resnet10t+resnet10t", dim=512))


@pytest.mark.parametrize(
    "config",
    [
        _config("irt", dim=16, extra={"projection": "linear"}),
        _vit_config("mean"),
        _config("abe", dim=32, extra={"num_learners": 2}),
        _config("osme", dim=32),
        _config("ensemble", backbone="resnet10t+resnet10t", dim=1024, pooling="gem"),
    ],
    ids=["irt-cnn", "irt-vit", "abe", "osme", "ensemble"],
)
def test_checkpoint_round_trip_gives_identical_embeddings(config: EmbedderConfig, tmp_path) -> None:
    model = create_embedder(config).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(pixels), loaded(pixels))
    assert loaded.config.to_dict() == {**config.to_dict(), "pretrained": "none"}
