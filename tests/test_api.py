"""Every endpoint through the app in-process (tiny embedder): add/get/list/update/delete, search by upload and by
stored image with filters and a score threshold, thumbnails, versions, health, metrics, errors. The routes do not
depend on the server process, so no uvicorn here; the add/search/filter/list/delete round trip, the SQL-heavy
one, runs on SQLite and on PostgreSQL, the rest on SQLite."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import CLASS_COLOURS, DATABASES, class_image, jpeg_bytes, migrated_url
from tests.test_api_helpers import app_client, build_served_corpus, client_on_each_db, upload


def served_settings(kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp(f"api-{kind}")
    return build_served_corpus(tmp, migrated_url(kind, request, tmp), max_upload_bytes=200_000)


@pytest.fixture(scope="module")
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app over 20 images on SQLite, shared by the module: each test leaves the corpus as it found it."""
    with app_client(served_settings("sqlite", request, tmp_path_factory)) as client:
        yield client


@pytest.fixture(scope="module", params=DATABASES)
def api_on_each_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   api: TestClient) -> Iterator[TestClient]:
    yield from client_on_each_db(request, api, lambda kind: served_settings(kind, request, tmp_path_factory))


def add(client: TestClient, image: Image.Image, label: str | None = None, **meta: object) -> httpx.Response:
    form: dict[str, object] = {"metadata": json.dumps(meta)}
    if label is not None:
        form["label"] = label
    return upload(client, jpeg_bytes(image), path="/v1/images", **form)


def result_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def test_health_ready_versions(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "detail": {}}
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["detail"]["vectors"] == 20 and ready["detail"]["database"] == "ok"
    models = api.get("/v1/models").json()["items"]
    indexes = api.get("/v1/indexes").json()["items"]
    assert [m["status"] for m in models] == ["active"] and models[0]["dim"] == 64
    assert indexes[0]["status"] == "active" and indexes[0]["name"] == ready["detail"]["index_version"]
    assert indexes[0]["ntotal"] == 20 and "build_seconds" in indexes[0]["metrics"]


def test_add_is_searchable_at_once_then_update_list_delete(api_on_each_db: TestClient) -> None:
    api = api_on_each_db
    image = class_image("blue", seed=4242)
    created = add(api, image, label="blue", color="navy", year=2021)
    assert created.status_code == 201, created.text
    body = created.json()
    image_id = body["id"]
    assert created.headers["location"] == f"/v1/images/{image_id}"
    assert body["label"] == "blue" and body["metadata"] == {"color": "navy", "year": 2021}
    # Stored under its content hash, never the client's file name.
    assert Path(body["uri"]).name == f"{body['sha256']}.jpg" and "query" not in body["uri"]

    # Searchable as soon as the 201 is back: the same bytes come back first, with a score of ~1.
    hits = upload(api, jpeg_bytes(image), k=3).json()["results"]
    assert hits[0]["id"] == image_id and hits[0]["score"] > 0.99
    assert hits[0]["thumbnail_url"] == f"/v1/images/{image_id}/thumbnail"

    duplicate = add(api, image, label="blue")
    assert duplicate.status_code == 409 and duplicate.json()["detail"] == {"id": image_id}

    # Metadata filters (string and number), label filter, and the score threshold.
    assert result_ids(upload(api, jpeg_bytes(image), k=5, meta=["color=navy"])) == [image_id]
    assert result_ids(upload(api, jpeg_bytes(image), k=5, meta=["color=navy", "year=2021"])) == [image_id]
    assert result_ids(upload(api, jpeg_bytes(image), k=5, meta=["color=red"])) == []
    red = result_ids(upload(api, jpeg_bytes(image), k=50, label="red"))
    assert len(red) == 5  # all 5 red images, even though they are not the nearest ones
    strict = upload(api, jpeg_bytes(image), k=50, min_score=0.999).json()["results"]
    assert [h["id"] for h in strict] == [image_id]

    # Search by stored image: itself excluded, filters apply.
    similar = api.get(f"/v1/images/{image_id}/similar", params={"k": 4}).json()["results"]
    assert len(similar) == 4 and image_id not in [h["id"] for h in similar]
    assert all(h["label"] == "green" for h in api.get(
        f"/v1/images/{image_id}/similar", params={"k": 3, "label": "green"}).json()["results"])

    # Update: a merge patch on metadata, a new label.
    patched = api.patch(f"/v1/images/{image_id}", json={"label": "navy", "metadata": {"year": None,
                                                                                             "shade": "dark"}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["label"] == "navy" and patched.json()["metadata"] == {"color": "navy", "shade": "dark"}
    assert api.get(f"/v1/images/{image_id}").json()["metadata"]["shade"] == "dark"

    # List with keyset paging and filters.
    page1 = api.get("/v1/images", params={"limit": 15}).json()
    assert page1["total"] == 21 and len(page1["items"]) == 15 and page1["next_cursor"] is not None
    page2 = api.get("/v1/images", params={"limit": 15, "cursor": page1["next_cursor"]}).json()
    assert len(page2["items"]) == 6 and page2["next_cursor"] is None
    ids = [i["id"] for i in page1["items"] + page2["items"]]
    assert ids == sorted(ids) and len(set(ids)) == 21
    assert [i["id"] for i in api.get("/v1/images", params={"meta": "shade=dark"}).json()["items"]] == [
        image_id]
    assert api.get("/v1/images", params={"label": "yellow"}).json()["total"] == 5

    # Thumbnail: a JPEG no larger than the configured size.
    thumb = api.get(f"/v1/images/{image_id}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256

    # Delete: gone from results, from similar, from get and list, at once.
    assert api.delete(f"/v1/images/{image_id}").status_code == 204
    assert image_id not in result_ids(upload(api, jpeg_bytes(image), k=30))
    assert result_ids(upload(api, jpeg_bytes(image), k=5, meta=["color=navy"])) == []
    assert api.get(f"/v1/images/{image_id}").status_code == 404
    assert api.get(f"/v1/images/{image_id}/similar").status_code == 404
    assert api.delete(f"/v1/images/{image_id}").status_code == 404
    assert api.get("/v1/images").json()["total"] == 20
    # k live results come back whenever k live images exist.
    assert len(result_ids(upload(api, jpeg_bytes(image), k=20))) == 20

    # Re-adding deleted bytes brings the image back under its old id.
    again = add(api, image, label="blue")
    assert again.status_code == 201 and again.json()["id"] == image_id
    assert result_ids(upload(api, jpeg_bytes(image), k=1)) == [image_id]
    assert api.delete(f"/v1/images/{image_id}").status_code == 204


def test_errors_are_json(api: TestClient) -> None:
    cases = [
        (api.get("/v1/nothing-here"), 404),
        (api.get("/v1/images/999999"), 404),
        (api.get("/v1/images/0"), 422),
        (api.get("/v1/images", params={"meta": "no-equals-sign"}), 422),
        (api.patch("/v1/images/1", json={"unknown": 1}), 422),
        (upload(api, b"not an image at all"), 415),
        (upload(api, b""), 400),
        (upload(api, jpeg_bytes(class_image("red", 1)), k=0), 422),
        (upload(api, jpeg_bytes(class_image("red", 1)), path="/v1/images", metadata="[1, 2]"), 422),
        (upload(api, b"\xff" * 400_000), 413),  # over the streaming body limit
        (api.delete("/v1/images"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        body = response.json()
        assert set(body) <= {"error", "message", "detail"} and body["error"] and body["message"]


def test_form_fields_sent_in_the_query_string_are_refused_not_ignored(api: TestClient) -> None:
    """`curl -F file=@q.jpg '.../v1/search?k=3'` once answered 10 results: k was silently dropped."""
    query = jpeg_bytes(class_image("red", 1))
    for path, params, misplaced in (("/v1/search", {"k": "3", "effort": "fast"}, ["effort", "k"]),
                                    ("/v1/search/recommend", {"k": "3"}, ["k"]),
                                    ("/v1/images", {"label": "red"}, ["label"])):
        files = {"positive_file" if "recommend" in path else "file": ("q.jpg", query, "image/jpeg")}
        refused = api.post(path, params=params, files=files)
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"] == {"query_parameters": misplaced}
        assert "must be sent as multipart form fields" in refused.json()["message"]
        assert f"-F {misplaced[0]}={params[misplaced[0]]}" in refused.json()["message"]
    # Anything else in the query string (a cache-buster, a tracing tag) is none of the route's business.
    answered = api.post("/v1/search", params={"cachebust": "1"}, files={"file": ("q.jpg", query, "image/jpeg")},
                        data={"k": "3"})
    assert answered.status_code == 200 and len(answered.json()["results"]) == 3


def test_a_body_that_is_not_multipart_is_refused_with_the_curl_form(api: TestClient) -> None:
    """`curl -d '{"k": 3}' .../v1/search` once answered 422 "body.file: Field required", with no word of how."""
    query = jpeg_bytes(class_image("red", 1))
    for path, example in (("/v1/search", "-F file=@photo.jpg"), ("/v1/images", "-F file=@photo.jpg"),
                          ("/v1/search/recommend", "-F positive_file=@photo.jpg")):
        for sent, request in (("application/json", {"json": {"k": 3}}),
                              ("application/octet-stream",
                               {"content": query, "headers": {"Content-Type": "application/octet-stream"}}),
                              (None, {})):
            refused = api.post(path, **request)
            assert refused.status_code == 415, (path, sent, refused.text)
            body = refused.json()
            assert body["error"] == "unsupported_media_type" and body["detail"]["content_type"] == sent
            assert "takes multipart/form-data" in body["message"], body
            assert f"curl {example}" in body["message"] and f"http://testserver{path}" in body["message"], body
    # A urlencoded form cannot carry the upload a search needs...
    assert api.post("/v1/search", data={"k": "3"}).status_code == 415
    # ...but is all that feedback by stored ids takes, and multipart with its boundary parameter passes.
    by_ids = api.post("/v1/search/recommend", data={"positive": "1", "k": "3"})
    assert by_ids.status_code == 200 and len(by_ids.json()["results"]) == 3
    answered = api.post("/v1/search", files={"file": ("q.jpg", query, "image/jpeg")}, data={"k": "3"})
    assert answered.status_code == 200 and len(answered.json()["results"]) == 3


def test_metrics_have_stage_histograms_and_counters(api: TestClient) -> None:
    for label in CLASS_COLOURS:
        upload(api, jpeg_bytes(class_image(label, seed=77)), k=3).raise_for_status()
    text = api.get("/metrics").text
    for stage in ("decode", "preprocess", "forward", "search", "metadata"):
        count = next(line for line in text.splitlines()
                     if line.startswith(f'retrieval_stage_seconds_count{{stage="{stage}"}}'))
        assert float(count.split()[-1]) >= 4, count
    assert 'retrieval_http_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert "retrieval_batch_size_bucket" in text and "retrieval_queue_depth" in text
    assert "retrieval_index_vectors" in text


def test_page_and_openapi_are_served(api: TestClient) -> None:
    page = api.get("/")
    assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text
    assert api.get("/static/app.js").status_code == 200
    spec = api.get("/openapi.json").json()
    assert {"/v1/search", "/v1/images", "/v1/images/{image_id}", "/v1/images/{image_id}/similar",
            "/v1/images/{image_id}/thumbnail", "/v1/models", "/v1/indexes", "/healthz", "/readyz",
            "/metrics"} <= set(spec["paths"])
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]


def test_swagger_ui_is_served_from_this_host(api: TestClient) -> None:
    """/docs once loaded Swagger UI from a CDN: a blank page on an offline host."""
    docs = api.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "//" not in docs.text.replace("<!DOCTYPE html>", ""), docs.text  # no scheme, no other host
    assets = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", docs.text)
    assert sorted(assets) == ["/swagger-ui/favicon-32x32.png", "/swagger-ui/swagger-ui-bundle.js",
                              "/swagger-ui/swagger-ui.css"], assets
    for asset in assets:
        served = api.get(asset)
        assert served.status_code == 200 and len(served.content) > 500, asset
    script = api.get("/swagger-ui/swagger-ui-bundle.js")
    assert "javascript" in script.headers["content-type"] and b"SwaggerUIBundle" in script.content
    assert "url: '/openapi.json'" in docs.text
