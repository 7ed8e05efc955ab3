"""Query-by-image through the app in-process, with the real default embedder, and every kind of bad input. What
comes back does not depend on the database or the server process: SQLite, no uvicorn (tests/test_api.py runs the
routes on PostgreSQL too)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import CLASS_COLOURS, class_image, jpeg_bytes, make_settings, migrated_url
from tests.test_api_helpers import app_client


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def served(request: pytest.FixtureRequest, image_folder: Path, tmp_path: Path) -> Iterator[TestClient]:
    from app.indexing import build_index

    url = migrated_url("sqlite", request, tmp_path)
    settings = make_settings(tmp_path / "data", url, max_upload_bytes=300_000, max_k=20)
    report = build_index(settings, image_folder, progress=False)
    assert report.added == 24
    with app_client(settings) as client:
        yield client


def search(client: TestClient, data: bytes, filename: str = "q.jpg", **form: object) -> httpx.Response:
    return client.post("/v1/search", files={"file": (filename, data, "image/jpeg")},
                       data={k: str(v) for k, v in form.items()})


def test_search_round_trip_and_bad_input(served: TestClient) -> None:
    assert served.get("/healthz").json()["status"] == "ok"
    ready = served.get("/readyz").json()
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
    image = served.get(f"/v1/images/{hit['id']}").json()
    assert image["label"] == hit["label"] and image["uri"].endswith(".jpg") and len(image["sha256"]) == 64
    missing = served.get("/v1/images/999999")
    assert missing.status_code == 404 and "999999" in missing.json()["message"]

    valid = jpeg_bytes(class_image("red", 5))
    bad_cases = {
        "empty": (search(served, b""), 400),
        "text named .jpg": (search(served, b"just some text, honestly\n" * 4, "photo.jpg"), 415),
        "truncated JPEG": (search(served, valid[: len(valid) // 2]), 400),
        "pixel bomb": (search(served, png_bytes(Image.new("1", (10_000, 5_000))), "bomb.png"), 413),
        "over the byte limit": (search(served, b"\xff\xd8" + b"\x00" * 1_000_000), 413),
        "k over RETRIEVAL_MAX_K": (search(served, valid, k=21), 422),
        "similar, k over RETRIEVAL_MAX_K": (served.get(f"/v1/images/{hit['id']}/similar?k=21"), 422),
        "k zero": (search(served, valid, k=0), 422),
        "no file": (served.post("/v1/search", files={"note": ("n.txt", b"x")}, data={"k": "3"}), 422),
        "a urlencoded form": (served.post("/v1/search", data={"k": "3"}), 415),
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


def test_a_phone_sized_photo_is_searched_without_touching_the_disk(request: pytest.FixtureRequest, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploads stay in memory up to the body limit: a 3-MB photo is answered even where no temporary file can be
    made (a full disk, a read-only /tmp). Starlette's default spooled anything past 1 MB to a file."""
    import numpy as np

    from tests.test_api_helpers import build_served_corpus

    settings = build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path), per_class=2)
    noise = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    photo = buf.getvalue()
    assert len(photo) > 2_000_000
    with app_client(settings) as client:
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "no-such-folder"))
        response = search(client, photo, k=3)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3
