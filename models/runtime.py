"""Inference runtimes behind the one Embedder: torch, ONNX Runtime and OpenVINO, chosen and checked here.

An embedder's eval-mode forward (flip averaging and every arch's pooling included) is exported once to ONNX
(models/export.py), keyed by its checkpoint's hash, and compiled by the runtime. No runtime serves before it
passes a parity check against torch fp32 on a probe batch of real images: cosine >= PARITY_MIN for every image,
else it is refused with one log line saying why and the next choice is tried. Torch always works, so a model
always serves.

`select_runner` picks, for `requested`:
- "auto" on CPU: OpenVINO, then ONNX Runtime, then torch (OpenVINO fp32 is 1.35x ONNX Runtime fp32 and ~5x
  eager torch here, docs/benchmarks.md).
- "auto" on CUDA: torch with bf16 (fp16 where bf16 is missing) autocast and channels_last, then torch fp32.
- "openvino" / "onnxruntime": that runtime, then torch.
- "torch": torch only.
`precision`: "fp32"; "reduced" (bf16, or fp16 where bf16 is missing: OpenVINO's default precision on CPU, autocast
on CUDA; fp32 is still tried after it); "auto" is "reduced" on CUDA and "fp32" on CPU, because bf16 on CPU misses
the parity floor on real photos (cub100: worst image 0.9944, docs/quality.md), so whether it would serve would
hang on which images happen to be probed.
Every runner takes a preprocessed float32 batch [B, 3, H, W] (a CPU tensor) and returns float32 [B, D].
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.embedder import Embedder, EmbedderConfig
from models.export import ensure_onnx

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "reduced")
# The floor every image of the probe batch must reach, cosine to torch fp32, before a runtime may serve.
PARITY_MIN = 0.999


@dataclass
class RuntimeInfo:
    """What serves, in words /readyz and GET /v1/models report."""

    runtime: str
    precision: str
    device: str
    parity_min_cosine: float | None = None  # None: torch fp32, the reference itself
    probe_images: int = 0
    refused: list[str] = field(default_factory=list)  # why earlier choices did not serve

    @property
    def on_gpu(self) -> bool:
        """Whether the forward pass runs on a GPU: ONNX Runtime asked for CUDA without its CUDA provider reports
        "cuda:0 (cpu)" and runs on the CPU."""
        return self.device.startswith("cuda") and not self.device.endswith("(cpu)")

    def as_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "precision": self.precision, "device": self.device,
                "parity_min_cosine": self.parity_min_cosine, "probe_images": self.probe_images,
                "refused": list(self.refused)}


class Runner(Protocol):
    config: EmbedderConfig
    info: RuntimeInfo

    @property
    def dim(self) -> int: ...

    def run(self, pixels: torch.Tensor) -> np.ndarray: ...


class TorchRunner:
    """Eager torch. CPU: fp32, channels_last (1.6x NCHW for the CNNs here). CUDA: autocast to bf16 (fp16 where the
    GPU lacks bf16, or asked for with autocast="fp16") and channels_last, or fp32 when `autocast` is False (with
    torch's defaults: cuDNN's convolutions in TF32 on GPUs that have it; the parity reference turns them off)."""

    def __init__(self, embedder: Embedder, device: torch.device, autocast: bool | str = True) -> None:
        self.embedder = embedder.to(device=device, memory_format=torch.channels_last).eval()
        self.config = embedder.config
        self.device = device
        self.autocast_dtype: torch.dtype | None = None
        if device.type == "cuda" and autocast:
            bf16 = autocast != "fp16" and torch.cuda.is_bf16_supported()
            self.autocast_dtype = torch.bfloat16 if bf16 else torch.float16
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        self.info = RuntimeInfo("torch", precision, str(device))

    @property
    def dim(self) -> int:
        return self.config.dim

    @torch.inference_mode()
    def run(self, pixels: torch.Tensor) -> np.ndarray:
        pixels = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            out = self.embedder(pixels)
        else:
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                out = self.embedder(pixels)
        return out.float().cpu().numpy()


class OnnxRuntimeRunner:
    """ONNX Runtime on the exported graph: the CUDA provider on a CUDA device when installed, else the CPU one."""

    def __init__(self, onnx_path: Path, config: EmbedderConfig, device: torch.device, threads: int) -> None:
        import onnxruntime as ort

        ort.disable_telemetry_events()  # a service should not phone home (ONNX Runtime's Linux wheels do by default)
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one graph, run sequentially: parallelism is within each operator
        # Idle intra-op threads otherwise spin-wait for the next operator, burning the cores the HTTP server,
        # the decoders and the next batch's preprocessing need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.config = config
        used = self.session.get_providers()[0].replace("ExecutionProvider", "").lower()
        self.info = RuntimeInfo("onnxruntime", "fp32", f"{device} ({used})")

    @property
    def dim(self) -> int:
        return self.config.dim

    def run(self, pixels: torch.Tensor) -> np.ndarray:  # InferenceSession.run is thread-safe
        return self.session.run(None, {self.input_name: pixels.numpy()})[0].astype(np.float32, copy=False)


def _compile_on_a_throwaway_thread(core: Any, onnx_path: Path, properties: dict[str, Any]) -> Any:
    """`core.compile_model` on a thread that ends right after.

    OpenVINO's CPU plugin gives the compiling thread a signal stack of its own (sigaltstack) and unmaps it when
    the compiled model is released, from whichever thread releases it, without telling the compiling thread. That
    thread then dies of SIGSEGV (si_code SI_KERNEL) on its next signal, because the kernel cannot write the signal
    frame (Python installs its handlers with SA_ONSTACK). Compiled on the main thread and released on another, that
    killed the test suite (docs/benchmarks.md). A thread that has ended holds no signal stack, so no living
    thread is left with a dangling one."""
    # Leaving the block joins the pool's one thread; an error is raised here, on the caller's thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino-compile") as pool:
        return pool.submit(core.compile_model, str(onnx_path), "CPU", properties).result()


class OpenVinoRunner:
    """OpenVINO on the CPU. `precision` "reduced" keeps its default (bf16 on CPUs with AVX-512 BF16 or AMX, else
    fp32); "fp32" forces fp32. Compiled blobs are cached beside the export, so a restart does not recompile."""

    def __init__(self, onnx_path: Path, config: EmbedderConfig, precision: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(onnx_path.parent / "openvino")}
        if threads > 0:
            properties["INFERENCE_NUM_THREADS"] = threads
        if precision == "fp32":
            properties["INFERENCE_PRECISION_HINT"] = "f32"
        self.compiled = _compile_on_a_throwaway_thread(core, onnx_path, properties)
        used = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f16", "f32"
        self.config = config
        self.info = RuntimeInfo("openvino", {"bf16": "bf16", "f16": "fp16"}.get(used, "fp32"), "cpu")
        # An infer request per thread: the batcher's forward thread and the index build never share one.
        self._local = threading.local()

    @property
    def dim(self) -> int:
        return self.config.dim

    def run(self, pixels: torch.Tensor) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: pixels.numpy()}, share_inputs=True)
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)


def candidates(requested: str, device: torch.device, precision: str) -> list[tuple[str, str]]:
    """(runtime, precision) in the order `select_runner` tries them."""
    if requested not in RUNTIMES:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    reduced = precision == "reduced" or (precision == "auto" and device.type == "cuda")
    # bf16 first (fp32's range), then fp16 (three more mantissa bits, as fast on the GPUs that have bf16) when
    # bf16 misses the parity floor.
    fast_torch = [("torch", "reduced"), ("torch", "fp16")] if device.type == "cuda" and reduced else []
    openvino = [("openvino", "reduced")] if reduced else []
    openvino.append(("openvino", "fp32"))
    if requested == "torch":
        order = fast_torch
    elif requested == "openvino":
        order = openvino
    elif requested == "onnxruntime":
        order = [("onnxruntime", "fp32")]
    elif device.type == "cuda":  # auto: measured fastest on a GPU is torch with autocast (docs/benchmarks.md)
        order = fast_torch
    else:  # auto on CPU: the fastest here first (docs/benchmarks.md)
        order = [*openvino, ("onnxruntime", "fp32")]
    return [*order, ("torch", "fp32")]


def cosine_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


@torch.inference_mode()
def reference_embeddings(embedder: Embedder, probe: torch.Tensor) -> np.ndarray:
    """Torch fp32, eager, NCHW: what every runtime is checked against (on CUDA without the TF32 convolutions
    cuDNN uses by default, which keep 10 bits of mantissa)."""
    device = next(embedder.parameters()).device
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return embedder.eval()(probe.to(device)).float().cpu().numpy()


def _build(name: str, precision: str, embedder: Embedder, device: torch.device, export_dir: Path | None,
           threads: int) -> Runner:
    if name == "torch":
        return TorchRunner(embedder, device, autocast={"reduced": True, "fp16": "fp16"}.get(precision, False))
    if name == "openvino" and device.type != "cpu":  # before exporting: the export would be wasted
        raise RuntimeError(f"OpenVINO serves on the CPU here, not on {device}")
    if export_dir is None:
        raise RuntimeError("no directory to store the export in")
    # Import the runtime before exporting, so a missing package is told as such and costs no export.
    __import__(name)
    onnx_path = ensure_onnx(embedder, export_dir)
    if name == "onnxruntime":
        return OnnxRuntimeRunner(onnx_path, embedder.config, device, threads)
    return OpenVinoRunner(onnx_path, embedder.config, precision, threads)


def select_runner(embedder: Embedder, device: torch.device, probe: torch.Tensor, export_dir: Path | None,
                  requested: str = "auto", precision: str = "auto", threads: int = 0,
                  reference: np.ndarray | None = None) -> Runner:
    """The first runtime in `candidates` order that builds and passes the parity check on `probe`.

    `export_dir` is where this checkpoint's exports live (models.export.export_dir); None allows torch only.
    `threads` caps the runtime's own thread pool (0: the runtime's default, all cores). `reference`: the torch
    fp32 embeddings of `probe` when the caller has them (`reference_embeddings`); else computed here, once, and
    only if a runtime needs checking."""
    embedder = embedder.to(device).eval()
    refused: list[str] = []
    missing: set[str] = set()
    tried: set[tuple[str, str]] = set()  # ("torch", "fp16") comes twice on a GPU without bf16
    for name, want in candidates(requested, device, precision):
        label = f"{name} ({want} precision)"
        if name in missing:
            continue
        try:
            runner = _build(name, want, embedder, device, export_dir, threads)
        except ImportError as exc:
            reason = f"{name}: the package is not installed ({exc}); pip install {name}"
            missing.add(name)
            refused.append(reason)
            log.warning("inference runtime %s", reason)
            continue
        except Exception as exc:  # an arch that does not export, a runtime that cannot compile it
            reason = f"{label}: could not be built: {exc.__class__.__name__}: {str(exc)[:300]}"
            refused.append(reason)
            log.warning("inference runtime %s", reason)
            continue
        if (name, runner.info.precision) in tried:
            continue
        tried.add((name, runner.info.precision))
        runner.info.probe_images = len(probe)
        if (name, runner.info.precision) != ("torch", "fp32"):
            if reference is None:
                reference = reference_embeddings(embedder, probe)
            worst = float(cosine_per_image(runner.run(probe.cpu()), reference).min())
            runner.info.parity_min_cosine = round(worst, 6)
            if not worst >= PARITY_MIN:  # also refuses NaN
                reason = (f"{name} {runner.info.precision}: refused, cosine to torch fp32 is {worst:.5f} on its "
                          f"worst of {len(probe)} probe images (needs >= {PARITY_MIN})")
                refused.append(reason)
                log.warning("inference runtime %s", reason)
                continue
        runner.info.refused = refused
        log.info("inference runtime: %s %s on %s%s", runner.info.runtime, runner.info.precision, runner.info.device,
                 "" if runner.info.parity_min_cosine is None
                 else f" (min cosine to torch fp32 {runner.info.parity_min_cosine:.5f} on {len(probe)} images)")
        return runner
    raise AssertionError("torch fp32 is always the last candidate")  # pragma: no cover


def synthetic_probe(config: EmbedderConfig, count: int = 4, seed: int = 0) -> torch.Tensor:
    """Smooth, structured images in the model's input space: the probe when no real image is at hand."""
    rng = np.random.default_rng(seed)
    size = config.image_size
    grid = np.linspace(0, 1, size, dtype=np.float32)
    batch = []
    for _ in range(count):
        fx, fy, phase = rng.uniform(1, 6, size=3)
        channels = [np.sin(2 * np.pi * (fx * grid[None, :] + c * phase) + fy * grid[:, None] * 3) for c in range(3)]
        image = 0.5 + 0.4 * np.stack(channels) + rng.normal(0, 0.05, (3, size, size)).astype(np.float32)
        mean = np.asarray(config.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.std, dtype=np.float32)[:, None, None]
        batch.append((np.clip(image, 0, 1) - mean) / std)
    return torch.from_numpy(np.stack(batch).astype(np.float32))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
