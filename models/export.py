"""Export once, reuse: an embedder's eval-mode forward as ONNX, stored beside its checkpoint under the checkpoint's
hash (<checkpoint>/exports/<hash>/model.onnx), so new weights get a new export and old ones are never reused.

The graph is traced through `Embedder.__call__`, so flip averaging, ensembles and the part embedders' pooling are
in it; the batch dimension is dynamic. Writes go to a temporary file renamed into place, so a process killed
mid-export leaves no half file that a later load would trust.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch

from models.checkpoint import CONFIG, WEIGHTS
from models.embedder import Embedder

ONNX_FILE = "model.onnx"
OPSET = 17


def checkpoint_hash(checkpoint_dir: str | Path) -> str:
    """sha256 over the checkpoint's config and weights (first 16 hex digits): what an export is keyed by."""
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(Path(checkpoint_dir) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def export_dir(checkpoint_dir: str | Path) -> Path:
    """Where the exports of this checkpoint's current weights live."""
    return Path(checkpoint_dir) / "exports" / checkpoint_hash(checkpoint_dir)


def export_onnx(embedder: Embedder, path: Path) -> Path:
    """Trace `embedder` (eval mode) to ONNX at `path`, atomically."""
    embedder = embedder.eval()
    device = next(embedder.parameters()).device
    config = embedder.config
    example = torch.zeros(2, 3, config.image_size, config.image_size, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # The TorchScript-based exporter: it needs no onnxscript and handles every arch here; its deprecation
            # and tracer warnings say nothing about this model.
            warnings.simplefilter("ignore")
            torch.onnx.export(embedder, (example,), tmp, dynamo=False, opset_version=OPSET,
                              input_names=["pixels"], output_names=["embedding"],
                              dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ensure_onnx(embedder: Embedder, directory: Path) -> Path:
    """The ONNX export in `directory` (an `export_dir`), made now if it is not there yet."""
    path = directory / ONNX_FILE
    if not path.is_file():
        export_onnx(embedder, path)
    return path
