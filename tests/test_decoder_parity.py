"""One decoder for training, evaluation and queries: odd-but-valid files give the same tensors on every path.

Training (models' ItemsDataset with the training transform), the worker's evaluation (embed_items, as run_train
calls it) and a query (decode the uploaded bytes, then the model's preprocess, as the search route does) all read
the file through app.images; the old `Image.open(path).convert("RGB")` in models/ got each of these wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.images import ImageError, decode_image, file_loader
from models.data import ItemsDataset, train_transform
from models.embedder import EmbedderConfig
from models.evaluate import embed_items
from models.zoo import create_embedder
from tests.conftest import make_settings

CONFIG = EmbedderConfig(arch="timm", backbone="resnet10t", dim=32, image_size=48, resize_size=56)


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored sideways (40 wide, 64 high) with EXIF orientation 6: displayed upright it is 64 wide."""
    pixels = np.zeros((64, 40, 3), np.uint8)
    pixels[:, :, 2] = 200
    pixels[:16, :, 0] = 240  # a red band along the stored top edge
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())


def _rgba_png(path: Path) -> None:
    """Transparent where its colour channels are black: on a page (and in the decoder) that area is white."""
    rgba = np.zeros((50, 60, 4), np.uint8)
    rgba[10:40, 15:45] = (30, 160, 60, 255)
    Image.fromarray(rgba, "RGBA").save(path)


def _grey16_png(path: Path) -> None:
    """A 16-bit grey ramp over the whole range: clipping at 255 would make nearly all of it white."""
    ramp = np.tile(np.linspace(0, 65535, 60), (50, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(path)


@pytest.fixture
def odd_files(tmp_path: Path) -> list[tuple[str, int]]:
    paths = [tmp_path / "rotated.jpg", tmp_path / "transparent.png", tmp_path / "grey16.png"]
    for make, path in zip((_exif_rotated_jpeg, _rgba_png, _grey16_png), paths, strict=True):
        make(path)
    return [(str(path), label) for label, path in enumerate(paths)]


def test_training_evaluation_and_queries_see_the_same_pixels(odd_files, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'unused.db'}")
    load_image = file_loader(settings)  # what the worker and `retrieval train/eval` pass to models/
    embedder = create_embedder(CONFIG).eval()
    augment = train_transform(CONFIG)
    training = ItemsDataset(odd_files, augment, load_image)
    evaluation = ItemsDataset(odd_files, embedder.preprocess, load_image)  # what embed_items iterates

    queries = []
    for index, (path, _) in enumerate(odd_files):
        uploaded = decode_image(Path(path).read_bytes(), settings.max_upload_bytes, settings.max_image_pixels)
        query = embedder.preprocess(uploaded)
        queries.append(query)
        assert torch.equal(evaluation[index][0], query), path
        torch.manual_seed(index)  # the same random crop and flip on both sides
        trained_on = training[index][0]
        torch.manual_seed(index)
        assert torch.equal(trained_on, augment(uploaded)), path
        # The files do test something: the old decoding in models/ gave other pixels for each of them.
        with Image.open(path) as image:
            assert not torch.equal(embedder.preprocess(image.convert("RGB")), query), path

    embeddings, labels = embed_items(embedder, odd_files, load_image, batch_size=2, num_workers=0)
    with torch.inference_mode():
        expected = embedder(torch.stack(queries)).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    assert labels.tolist() == [0, 1, 2]


def test_the_loader_keeps_the_services_size_limits(odd_files, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'unused.db'}", max_image_pixels=1000)
    dataset = ItemsDataset(odd_files, create_embedder(CONFIG).preprocess, file_loader(settings))
    with pytest.raises(ImageError, match="the limit is 1000 pixels") as failure:
        dataset[0]
    assert failure.value.__notes__ == [f"while reading {odd_files[0][0]} (item 0)"]


def test_the_loader_survives_dataloader_worker_processes(odd_files, tmp_path: Path) -> None:
    """DataLoader workers pickle the dataset, loader included (the worker and the CLI use 2 by default)."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'unused.db'}")
    embedder = create_embedder(CONFIG)
    in_process, _ = embed_items(embedder, odd_files, file_loader(settings), num_workers=0)
    in_workers, _ = embed_items(embedder, odd_files, file_loader(settings), num_workers=2)
    np.testing.assert_array_equal(in_process, in_workers)
