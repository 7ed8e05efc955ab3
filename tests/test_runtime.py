"""Inference runtimes (models/runtime.py, app/inference.py): every arch exports and matches torch fp32 on real
images in ONNX Runtime and (in a child process) OpenVINO; a broken export is refused and torch serves; a missing
runtime package falls back with a message; the export is made once, beside the checkpoint, keyed by its hash;
the service reports what serves; the index build and the service use the same runtime."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.inference import load_runner, probe_batch
from app.main import create_app
from models.checkpoint import load_checkpoint, save_checkpoint
from models.embedder import EmbedderConfig, eval_transform
from models.export import ONNX_FILE, export_dir, export_onnx
from models.runtime import PARITY_MIN, cosine_per_image, reference_embeddings, select_runner
from models.zoo import create_embedder
from tests.conftest import CLASS_COLOURS, class_image, jpeg_bytes, make_settings

SIZE = 64


def _config(arch: str, backbone: str = "resnet10t", dim: int = 64, **kwargs: object) -> EmbedderConfig:
    return EmbedderConfig(arch=arch, backbone=backbone, dim=dim, image_size=SIZE, resize_size=72, **kwargs)


ARCHS = {
    "timm": _config("timm"),
    "timm-gem-flip-averaged": _config("timm", pooling="gem", flip_average=True),
    "irt-vit": _config("irt", "vit_tiny_patch16_224", dim=192, pooling="cls",
                       extra={"backbone_kwargs": {"img_size": SIZE}}),
    "irt-linear": _config("irt", dim=16, extra={"projection": "linear"}),
    "abe": _config("abe", dim=32, extra={"num_learners": 4}),
    "osme": _config("osme", dim=32, extra={"num_parts": 2}),
    "ensemble": _config("ensemble", "resnet10t+resnet14t", dim=2560, pooling="gem"),
}


def real_probe(config: EmbedderConfig, count: int = 8) -> torch.Tensor:
    """Photos-like test images, JPEG round-tripped and preprocessed as queries are."""
    from app.images import decode_image

    transform = eval_transform(config)
    labels = list(CLASS_COLOURS)
    return torch.stack([transform(decode_image(jpeg_bytes(class_image(labels[i % 4], seed=i, size=96))))
                        for i in range(count)])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_runs_on_onnxruntime_with_parity(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    embedder = create_embedder(ARCHS[arch]).eval()
    probe = real_probe(embedder.config)
    runner = select_runner(embedder, torch.device("cpu"), probe, tmp_path, requested="onnxruntime")
    assert runner.info.runtime == "onnxruntime", runner.info.refused
    assert runner.info.parity_min_cosine >= PARITY_MIN and runner.info.refused == []
    # Another batch size than the probe's: the exported batch dimension is dynamic.
    pixels = real_probe(embedder.config, 3)
    out = runner.run(pixels)
    assert out.shape == (3, embedder.dim) and out.dtype == np.float32
    assert cosine_per_image(out, reference_embeddings(embedder, pixels)).min() >= PARITY_MIN


OPENVINO_CHILD = """
import json, sys, tempfile, torch
from pathlib import Path
from models.runtime import select_runner, cosine_per_image, reference_embeddings
from models.zoo import create_embedder
from tests.test_runtime import ARCHS, real_probe
out = {}
for arch, config in ARCHS.items():
    torch.manual_seed(0)
    embedder = create_embedder(config).eval()
    runner = select_runner(embedder, torch.device("cpu"), real_probe(config), Path(tempfile.mkdtemp()),
                           requested="openvino")
    pixels = real_probe(config, 3)
    worst = float(cosine_per_image(runner.run(pixels), reference_embeddings(embedder, pixels)).min())
    out[arch] = [runner.info.runtime, runner.info.parity_min_cosine, worst, runner.info.refused]
print("RESULT " + json.dumps(out))
"""


def test_every_arch_runs_on_openvino_with_parity() -> None:
    # In a child process: a process holding OpenVINO was seen to die with SIGSEGV when it later ran a
    # subprocess, and the rest of the suite runs many.
    import json
    import subprocess

    from tests.conftest import REPO

    child = subprocess.run([sys.executable, "-c", OPENVINO_CHILD], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert set(results) == set(ARCHS)
    for arch, (runtime, parity, worst, refused) in results.items():
        assert runtime == "openvino" and parity >= PARITY_MIN and worst >= PARITY_MIN, (arch, refused)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(create_embedder(_config("timm", dim=32)), tmp_path / "model")


def test_export_is_made_once_beside_the_checkpoint_and_keyed_by_its_hash(checkpoint: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", runtime="onnxruntime")
    from app.db.migrate import upgrade

    upgrade(settings.resolved_database_url)
    first = load_runner(settings, checkpoint)
    exported = export_dir(checkpoint) / ONNX_FILE
    assert first.info.runtime == "onnxruntime" and exported.is_file()
    assert exported.parent.parent == checkpoint / "exports"
    stamp = exported.stat().st_mtime_ns
    assert load_runner(settings, checkpoint).info.runtime == "onnxruntime"
    assert exported.stat().st_mtime_ns == stamp  # reused, not exported again
    # New weights in the same directory: a new key, so the old export is never served for them.
    torch.manual_seed(1)
    save_checkpoint(create_embedder(_config("timm", dim=32)), checkpoint)
    assert export_dir(checkpoint) != exported.parent


def test_a_broken_export_is_refused_and_torch_serves(checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    embedder = load_checkpoint(checkpoint)
    # A deliberately wrong export under this checkpoint's key: other weights of the same shape.
    torch.manual_seed(99)
    export_onnx(create_embedder(_config("timm", dim=32)).eval(), export_dir(checkpoint) / ONNX_FILE)
    probe = real_probe(embedder.config)
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        runner = select_runner(embedder, torch.device("cpu"), probe, export_dir(checkpoint),
                               requested="onnxruntime")
    assert (runner.info.runtime, runner.info.precision) == ("torch", "fp32")
    assert len(runner.info.refused) == 1 and all("refused, cosine to torch fp32" in r for r in runner.info.refused)
    assert "needs >= 0.999" in caplog.text
    # And torch serves the checkpoint's own weights.
    np.testing.assert_allclose(runner.run(probe), reference_embeddings(embedder, probe), atol=1e-4)


def test_a_missing_runtime_package_falls_back_with_a_clear_message(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # As if neither were installed: importing them raises ImportError.
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    embedder = load_checkpoint(checkpoint)
    probe = real_probe(embedder.config)
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        auto = select_runner(embedder, torch.device("cpu"), probe, export_dir(checkpoint), requested="auto")
        asked = select_runner(embedder, torch.device("cpu"), probe, export_dir(checkpoint), requested="openvino")
    assert auto.info.runtime == "torch" and len(auto.info.refused) == 2  # each missing package said once
    assert asked.info.runtime == "torch"
    assert asked.info.refused == ["openvino: the package is not installed (import of openvino halted; None in "
                                  "sys.modules); pip install openvino"]
    assert "pip install openvino" in caplog.text and "pip install onnxruntime" in caplog.text


def test_the_service_reports_its_runtime_and_the_build_uses_the_same(tmp_path: Path) -> None:
    from app.db.migrate import upgrade
    from app.indexing import build_index
    from index import versions
    from tests.test_indexing import make_corpus

    torch.manual_seed(0)
    model_dir = save_checkpoint(create_embedder(_config("timm", dim=32)), tmp_path / "tiny")
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", embedder=str(model_dir))
    upgrade(settings.resolved_database_url)
    build_index(settings, make_corpus(tmp_path / "corpus", 3), progress=False)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()["detail"]
        assert ready["runtime"] == "onnxruntime" and ready["precision"] == "fp32"
        models = client.get("/v1/models").json()["items"]
        serving = models[0]["serving"]
        assert serving["runtime"] == "onnxruntime" and serving["parity_min_cosine"] >= PARITY_MIN
        assert serving["probe_images"] == 8  # real stored images, not the synthetic fallback
        # A stored image searched by its bytes finds itself with the score of the same arithmetic: the build's
        # vector (float16 on disk) and the query's come from the same runtime.
        model_path = settings.models_dir / models[0]["name"]  # where the registry saved the version
        ids, vectors = versions.load_embeddings(settings.embeddings_dir(models[0]["name"]))
        first = client.get(f"/v1/images/{int(ids[0])}").json()
        query = Path(first["uri"]).read_bytes()
        hit = client.post("/v1/search", files={"file": ("q.jpg", query, "image/jpeg")}, data={"k": "1"}).json()
        assert hit["results"][0]["id"] == int(ids[0]) and hit["results"][0]["score"] > 0.999
        assert (export_dir(model_path) / ONNX_FILE).is_file()  # exported by the build, reused by the service
    probe = probe_batch(settings, load_checkpoint(model_dir).config)
    assert len(probe) == 8
