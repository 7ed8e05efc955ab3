"""The default embedder really carries ImageNet weights, and the one checkpoint format round-trips exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, read_config, save_checkpoint
from models.embedder import EmbedderConfig
from models.pretrained import create_backbone, load_local_weights
from models.zoo import PRESETS, create_embedder

skimage_data = pytest.importorskip("skimage.data")

# ImageNet-1k: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat; 967 espresso.
CAT_CLASSES = {281, 282, 283, 284, 285}


@pytest.fixture(scope="module")
def lite0_classifier():
    return create_backbone("tf_efficientnet_lite0", "package", num_classes=1000).eval()


@pytest.fixture(scope="module")
def lite0_embedder():
    return create_embedder("efficientnet_lite0")


def test_shipped_weights_classify_a_real_cat_and_coffee(lite0_classifier, lite0_embedder) -> None:
    photos = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    batch = torch.stack([lite0_embedder.preprocess(p) for p in photos])
    with torch.inference_mode():
        top = lite0_classifier(batch).argmax(dim=1).tolist()
    assert top[0] in CAT_CLASSES
    assert top[1] == 967


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_deeper_lite_weights_map_onto_their_layout(backbone, lite0_embedder) -> None:
    # Lite1/Lite2 have more blocks per stage than Lite0; a strict load with Lite0's layout used to fail.
    classifier = create_backbone(backbone, "package", num_classes=1000).eval()
    photos = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    batch = torch.stack([lite0_embedder.preprocess(p) for p in photos])  # same normalisation; 224 px is fine
    with torch.inference_mode():
        top = classifier(batch).argmax(dim=1).tolist()
    assert top[0] in CAT_CLASSES and top[1] == 967


def test_every_preset_builds_with_its_shipped_weights_and_declared_size() -> None:
    pixels = torch.rand(1, 3, 224, 224)
    for name, config in PRESETS.items():
        vectors = create_embedder(name).embed(pixels)
        assert vectors.shape == (1, config.dim), name
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embeddings_are_normalised_and_discriminative(lite0_embedder) -> None:
    cat, coffee, astronaut = (Image.fromarray(f()) for f in
                              (skimage_data.chelsea, skimage_data.coffee, skimage_data.astronaut))
    cat_flipped = cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    v = lite0_embedder.embed([cat, cat_flipped, coffee, astronaut])
    assert v.dtype == np.float32 and v.shape == (4, 1280)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    # A mirrored cat is closer to the cat than coffee or an astronaut are.
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[0, 3]


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path, lite0_embedder) -> None:
    save_checkpoint(lite0_embedder, tmp_path / "ckpt")
    config = read_config(tmp_path / "ckpt")
    assert (config.backbone, config.dim, config.mean) == ("tf_efficientnet_lite0", 1280, (0.5, 0.5, 0.5))
    restored = load_checkpoint(tmp_path / "ckpt")
    pixels = torch.rand(2, 3, 224, 224)
    np.testing.assert_array_equal(lite0_embedder.embed(pixels), restored.embed(pixels))


def test_local_weights_file_is_loaded(tmp_path) -> None:
    """The local-file path of create_backbone: weights a test saved come back exactly."""
    source = create_backbone("resnet10t", "none")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "weights.pth")
    loaded = create_backbone("resnet10t", str(tmp_path / "weights.pth"))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    wrong = create_backbone("resnet14t", "none")
    with pytest.raises(RuntimeError):
        load_local_weights(wrong, tmp_path / "weights.pth")


def test_projection_head_and_gem_pooling() -> None:
    config = EmbedderConfig(arch="timm", backbone="resnet10t", dim=64, image_size=64, resize_size=72, pooling="gem")
    model = create_embedder(config)
    out = model.embed(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
