"""The baseline service_bench.py measures against: the query-by-image server a user writes in an afternoon.

FastAPI + timm (the same checkpoint the service serves, loaded as a plain torch module), one eager fp32 forward
per request in FastAPI's threadpool, Pillow's full decode, a faiss Flat index over the service's own stored
embeddings and the same SQLite rows for the join. Started by the bench:

    RETRIEVAL_DATA_DIR=... NAIVE_MODEL_DIR=... [NAIVE_DEVICE=cuda] uvicorn bench.naive_server:app --port P
"""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import faiss
import torch
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from index.versions import load_embeddings
from models.checkpoint import load_checkpoint
from models.embedder import eval_transform

DATA_DIR = Path(os.environ["RETRIEVAL_DATA_DIR"])
MODEL_DIR = Path(os.environ["NAIVE_MODEL_DIR"])
DEVICE = torch.device(os.environ.get("NAIVE_DEVICE", "cpu"))

model = load_checkpoint(MODEL_DIR, device=DEVICE).eval()
transform = eval_transform(model.config)
ids, vectors = load_embeddings(DATA_DIR / "embeddings" / MODEL_DIR.name)
index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
index.add_with_ids(vectors, ids)
DB = str(DATA_DIR / "retrieval.db")

app = FastAPI()


@app.post("/v1/search")
def search(file: UploadFile = File(...), k: int = Form(10)) -> dict:
    image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
    with torch.inference_mode():
        vector = model(transform(image)[None].to(DEVICE)).cpu().numpy()
    scores, hits = index.search(vector, k)
    wanted = [int(i) for i in hits[0] if i >= 0]
    with sqlite3.connect(DB) as db:
        marks = ",".join("?" * len(wanted))
        rows = {r[0]: r for r in db.execute(f"SELECT id, uri, label FROM images WHERE id IN ({marks})", wanted)}
    return {"results": [{"id": i, "score": float(s), "uri": rows[i][1], "label": rows[i][2]}
                        for s, i in zip(scores[0].tolist(), hits[0].tolist(), strict=True) if i in rows]}


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready", "vectors": int(index.ntotal)}

