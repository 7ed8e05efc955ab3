"""Inference runtimes (models/runtime.py, app/inference.py): every arch exports and matches torch fp32 on real
images in ONNX Runtime and OpenVINO; a process survives signals after releasing an OpenVINO model; a broken
export is refused and torch serves; a missing runtime package falls back with a message; the export is made
once, beside the checkpoint, keyed by its hash; the service reports what serves; the index build and the
service use the same runtime."""

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


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_runs_on_each_runtime_with_parity(arch: str, runtime: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    embedder = create_embedder(ARCHS[arch]).eval()
    probe = real_probe(embedder.config)
    runner = select_runner(embedder, torch.device("cpu"), probe, tmp_path, requested=runtime)
    assert (runner.info.runtime, runner.info.precision) == (runtime, "fp32"), runner.info.refused
    assert runner.info.parity_min_cosine >= PARITY_MIN and runner.info.refused == []
    # Another batch size than the probe's: the exported batch dimension is dynamic.
    pixels = real_probe(embedder.config, 3)
    out = runner.run(pixels)
    assert out.shape == (3, embedder.dim) and out.dtype == np.float32
    assert cosine_per_image(out, reference_embeddings(embedder, pixels)).min() >= PARITY_MIN


SIGNAL_AFTER_RELEASE_CHILD = """
import gc, os, signal, sys, tempfile, threading, time, torch
from pathlib import Path
from models.runtime import select_runner
from models.zoo import create_embedder
from tests.test_runtime import ARCHS, real_probe
config = ARCHS["timm"]
holder = {"runner": select_runner(create_embedder(config).eval(), torch.device("cpu"), real_probe(config),
                                  Path(tempfile.mkdtemp()), requested="openvino")}
assert holder["runner"].info.runtime == "openvino", holder["runner"].info.refused
holder["runner"].run(real_probe(config, 2))
# What a hot swap does: the old model is released on another thread than the one that loaded it.
releaser = threading.Thread(target=lambda: (holder.clear(), gc.collect()))
releaser.start()
releaser.join()
signal.signal(signal.SIGUSR1, lambda *_: print("signal handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.2)
print("alive", flush=True)
"""


def test_a_process_that_released_an_openvino_model_survives_its_next_signal() -> None:
    """OpenVINO gives the thread that compiles a model a signal stack and unmaps it when the model is released
    from another thread; the loading thread then died of SIGSEGV at its next signal (this killed the test suite
    at a subprocess's exit). In a child process, because the failure is the process dying."""
    import subprocess

    from tests.conftest import REPO

    child = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_RELEASE_CHILD], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
    assert child.stdout.split() == ["signal", "handled", "alive"]


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
        assert ready["runtime"] == "openvino" and ready["precision"] == "fp32" and ready["index_device"] == "cpu"
        models = client.get("/v1/models").json()["items"]
        serving = models[0]["serving"]
        assert serving["runtime"] == "openvino" and serving["parity_min_cosine"] >= PARITY_MIN
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


def test_the_index_follows_a_gpu_model_only_where_faiss_can(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from app.deployment import place_index
    from index.vector_index import VectorIndex, gpu_available
    from models.runtime import RuntimeInfo

    def runner_on(device: str) -> SimpleNamespace:  # place_index reads only where the runner runs
        return SimpleNamespace(info=RuntimeInfo("torch", "bf16", device))

    flat = VectorIndex(8, "Flat")
    assert place_index(flat, runner_on("cpu")) == "cpu"
    assert place_index(flat, runner_on("cuda:0 (cpu)")) == "cpu"  # ONNX Runtime without its CUDA provider
    with caplog.at_level(logging.WARNING, logger="app.deployment"):
        placed = place_index(flat, runner_on("cuda:0"))
    if gpu_available():
        assert placed == "gpu" and flat.on_gpu
    else:  # faiss-cpu, as here: said in /readyz and in the log, with what to install
        assert placed == "cpu (this FAISS build has no GPU support; the `gpu` extra installs faiss-gpu-cu12)"
        assert "searched on the cpu (this FAISS build" in caplog.text and not flat.on_gpu
    assert place_index(VectorIndex(8, "HNSW16"), runner_on("cuda:0")) == "cpu (HNSW has no GPU version)"


def test_an_index_too_big_for_the_gpu_is_searched_on_the_cpu_until_a_copy_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss-gpu cannot run here: the GPU is said to be there, and its copy fails as out of GPU memory would
    while a hot swap holds two versions, then fits once the old one is gone."""
    from types import SimpleNamespace

    import faiss

    import index.vector_index as vector_index
    from app.deployment import place_index
    from models.runtime import RuntimeInfo

    def out_of_memory(index: object, resources: list) -> None:
        raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl::allocMemory: out of memory")

    monkeypatch.setattr(vector_index, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(vector_index, "_copy_to_gpus", out_of_memory)
    index = vector_index.VectorIndex(8, "Flat")
    index.add([1, 2], np.eye(2, 8, dtype=np.float32))
    placed = place_index(index, SimpleNamespace(info=RuntimeInfo("torch", "bf16", "cuda:0")))
    assert placed.startswith("cpu (copying it to the GPU failed: RuntimeError: Error in virtual")
    assert placed.endswith("tried again every 5 s)")
    assert index.search(np.eye(1, 8, dtype=np.float32), 1)[1][0, 0] == 1  # the CPU index answers
    monkeypatch.setattr(vector_index, "_copy_to_gpus",  # the old version's copy is gone: a CPU clone stands in
                        lambda index, resources: faiss.clone_index(index))
    monkeypatch.setattr(vector_index, "GPU_RECOPY_INTERVAL_S", 0.0)
    assert index.search(np.eye(1, 8, dtype=np.float32), 1)[1][0, 0] == 1
    assert index.placement() == "gpu"


def test_auto_serves_fp32_on_cpu_and_reduced_precision_only_when_asked() -> None:
    from models.runtime import candidates

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert candidates("auto", cpu, "auto") == [("openvino", "fp32"), ("onnxruntime", "fp32"), ("torch", "fp32")]
    assert candidates("auto", cpu, "reduced")[:2] == [("openvino", "reduced"), ("openvino", "fp32")]
    # On a GPU bf16 first, fp16 when bf16 misses the parity floor, then fp32.
    assert candidates("auto", cuda, "auto") == [("torch", "reduced"), ("torch", "fp16"), ("torch", "fp32")]
    assert candidates("auto", cuda, "fp32") == [("torch", "fp32")]


@pytest.mark.parametrize(("cheap_below_ms", "expected"), [(float("inf"), "one core less"), (0.0, "all cores")])
def test_the_api_leaves_a_core_for_request_handling_only_when_the_forward_pass_is_cheap(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cheap_below_ms: float,
        expected: str) -> None:
    """The serving rule's decision, not its timing: the threshold is pinned either side of any real measurement."""
    import app.inference
    import models.runtime
    from models.runtime import default_threads

    if default_threads() < 2:
        pytest.skip("one core: nothing to leave for request handling")
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", runtime="openvino")
    from app.db.migrate import upgrade

    upgrade(settings.resolved_database_url)
    monkeypatch.setattr(app.inference, "CHEAP_FORWARD_MS", cheap_below_ms)
    # Builds and the worker (serving=False) never time it: OpenVINO's own default, every core.
    every = load_runner(settings, checkpoint).compiled.get_property("INFERENCE_NUM_THREADS")
    references: list[int] = []  # torch fp32 passes over the probe for the parity check

    def counted(embedder, probe):  # noqa: ANN001, ANN202
        references.append(len(probe))
        return reference_embeddings(embedder, probe)

    monkeypatch.setattr(models.runtime, "reference_embeddings", counted)
    served = load_runner(settings, checkpoint, serving=True)
    assert served.compiled.get_property("INFERENCE_NUM_THREADS") == (
        every - 1 if expected == "one core less" else every)
    assert served.info.parity_min_cosine >= PARITY_MIN
    assert len(references) == 1  # built twice with one core less, but the reference is computed once
