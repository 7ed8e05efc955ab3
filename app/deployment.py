"""The serving pair: the active model version's embedder and the index built with it, loaded together."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from app.db.models import IndexVersion, ModelVersion
from app.db.session import session_scope
from app.registry import active_index
from app.settings import Settings
from index.vector_index import VectorIndex
from models.checkpoint import load_checkpoint
from models.embedder import Embedder, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    model_name: str
    index_name: str
    embedder: Embedder
    index: VectorIndex
    device: torch.device
    # One forward pass at a time on the device; FAISS search is thread-safe for readers.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.embedder.preprocess(im) for im in images])
        with self.lock:
            return self.embedder.embed(batch.to(self.device))


def load_deployment(settings: Settings, index_row: IndexVersion, model_row: ModelVersion) -> Deployment:
    device = resolve_device(settings.device)
    embedder = load_checkpoint(model_row.path, device=device)
    index = VectorIndex.load(index_row.path)
    if index.dim != embedder.dim:
        raise ValueError(
            f"index {index_row.name} has dimension {index.dim} but model {model_row.name} embeds to {embedder.dim}"
        )
    torch.set_grad_enabled(False)
    return Deployment(model_name=model_row.name, index_name=index_row.name, embedder=embedder, index=index,
                      device=device)


def load_active(settings: Settings) -> Deployment | None:
    with session_scope(settings.resolved_database_url) as session:
        index_row = active_index(session)
        if index_row is None:
            return None
        model_row = session.get(ModelVersion, index_row.model_version_id)
        assert model_row is not None
        return load_deployment(settings, index_row, model_row)
