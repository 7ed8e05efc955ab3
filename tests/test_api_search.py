"""Query-by-image through a real uvicorn server on loopback, with the real default embedder, on both databases."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import CLASS_COLOURS, class_image, jpeg_bytes, make_settings, settings_env
from tests.live_server import LiveServer


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def served(database_url: str, image_folder: Path, tmp_path: Path):
    from app.indexing import build_index

    settings = make_settings(tmp_path / "data", database_url, max_upload_bytes=300_000)
    report = build_index(settings, image_folder, progress=False)
    assert report.added == 24
    server = LiveServer(settings_env(settings) | {"RETRIEVAL_MAX_UPLOAD_BYTES": "300000", "RETRIEVAL_MAX_K": "20"},
                        tmp_path / "server.log").start()
    yield server
    server.stop()


def search(server: LiveServer, data: bytes, filename: str = "q.jpg", **form) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/search", files={"file": (filename, data, "image/jpeg")},
                      data={k: str(v) for k, v in form.items()}, timeout=60)


def test_search_round_trip_and_bad_input(served: LiveServer) -> None:
    base = served.base_url
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["status"] == "ready" and ready["detail"]["vectors"] == 24

    # Held-out images (seeds not in the corpus) of every class find their own class at rank 1.
    for label in CLASS_COLOURS:
        response = search(served, jpeg_bytes(class_image(label, seed=99_000 + len(label))), k=5)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["results"]) == 5
        assert body["results"][0]["label"] == label
        scores = [hit["score"] for hit in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert body["model_version"] == "efficientnet_lite0"
        assert body["timings"]["total_ms"] > 0

    hit = body["results"][0]
    image = httpx.get(f"{base}/v1/images/{hit['id']}").json()
    assert image["label"] == hit["label"] and image["uri"].endswith(".jpg") and len(image["sha256"]) == 64
    missing = httpx.get(f"{base}/v1/images/999999")
    assert missing.status_code == 404 and "999999" in missing.json()["message"]

    valid = jpeg_bytes(class_image("red", 5))
    bad_cases = {
        "empty": (search(served, b""), 400),
        "text named .jpg": (search(served, b"just some text, honestly\n" * 4, "photo.jpg"), 415),
        "truncated JPEG": (search(served, valid[: len(valid) // 2]), 400),
        "pixel bomb": (search(served, png_bytes(Image.new("1", (10_000, 5_000))), "bomb.png"), 413),
        "over the byte limit": (search(served, b"\xff\xd8" + b"\x00" * 1_000_000), 413),
        "k over RETRIEVAL_MAX_K": (search(served, valid, k=21), 422),
        "similar, k over RETRIEVAL_MAX_K": (httpx.get(f"{base}/v1/images/{hit['id']}/similar?k=21"), 422),
        "k zero": (search(served, valid, k=0), 422),
        "no file": (httpx.post(f"{base}/v1/search", data={"k": "3"}), 422),
    }
    for case, (response, status) in bad_cases.items():
        assert response.status_code == status, (case, response.status_code, response.text)
        body = response.json()
        assert body["error"] and body["message"], case

    for response in (bad_cases["k over RETRIEVAL_MAX_K"][0], bad_cases["similar, k over RETRIEVAL_MAX_K"][0]):
        assert "k" in response.json()["detail"][0]["loc"] and "20" in response.json()["message"]
    assert len(search(served, valid, k=20).json()["results"]) == 20  # the limit itself is allowed

    # The server is still healthy and answering after all of that.
    assert search(served, valid, k=1).json()["results"][0]["label"] == "red"
