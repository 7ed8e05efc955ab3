"""What a request's parameters mean, as a new user meets them, through the app in-process (tiny embedder): the
default k under a low RETRIEVAL_MAX_K, the accepted values of the job list's filters, one rule for an empty label
(on SQLite and PostgreSQL: it decides a SQL filter), unknown and repeated form fields, the 413 naming the configured
image limit, and the 415 for a JSON route sent a form."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import DATABASES, class_image, jpeg_bytes, migrated_url
from tests.test_api_helpers import app_client, build_served_corpus, client_on_each_db, upload

IMAGE_LIMIT = 200_000  # RETRIEVAL_MAX_UPLOAD_BYTES here; the body limit is this plus 64 KiB of multipart room
CORPUS = 12  # 3 images of each of the 4 classes


def served_settings(kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp(f"params-{kind}")
    return build_served_corpus(tmp, migrated_url(kind, request, tmp), per_class=3, max_upload_bytes=IMAGE_LIMIT)


@pytest.fixture(scope="module")
def settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return served_settings("sqlite", request, tmp_path_factory)


@pytest.fixture(scope="module")
def api(settings) -> Iterator[TestClient]:
    """One app over the 12 images on SQLite, shared by the module: each test leaves the corpus as it found it."""
    with app_client(settings) as client:
        yield client


@pytest.fixture(scope="module", params=DATABASES)
def api_on_each_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   api: TestClient) -> Iterator[TestClient]:
    yield from client_on_each_db(request, api, lambda kind: served_settings(kind, request, tmp_path_factory))


def query() -> bytes:
    return jpeg_bytes(class_image("red", 1))


def results(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]


def refused(response: httpx.Response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "message", "detail"} and body["error"] and body["message"], body
    return body


# -- 1. k ------------------------------------------------------------------------------------------------------

def test_a_search_without_k_gets_ten_results_or_max_k_when_that_is_lower(settings, api: TestClient) -> None:
    """With RETRIEVAL_MAX_K=5 every search that did not send k was a 422 ("body.k: Input should be less than or
    equal to 5"): the default was 10 whatever the limit."""
    with app_client(settings, max_k=5) as low:
        assert len(results(upload(low, query()))) == 5
        assert len(results(low.get("/v1/images/1/similar"))) == 5
        assert len(results(low.post("/v1/search/recommend", data={"positive": "1"}))) == 5
        # k itself is still checked against the limit, and named
        over = refused(upload(low, query(), k=6))
        assert over["detail"][0]["loc"] == ["body", "k"] and "5" in over["message"]
        assert low.get("/readyz").json()["detail"]["max_k"] == 5  # what the query page follows
        # Paging with k=3 hands out next_offset 3; that page, asked with the same k, stops at the limit (it was a
        # 422 for offset + k past max_k). An offset at the limit is still refused.
        first = upload(low, query(), k=3).json()
        last = upload(low, query(), k=3, offset=first["next_offset"]).json()
        assert first["next_offset"] == 3 and len(last["results"]) == 2 and last["next_offset"] is None
        assert refused(upload(low, query(), k=3, offset=5))["detail"][0]["loc"] == ["body", "offset"]

    # Under the default limit (100) the default k is 10.
    assert len(results(upload(api, query()))) == 10
    assert len(results(api.get("/v1/images/1/similar"))) == 10
    assert api.get("/readyz").json()["detail"]["max_k"] == 100
    spec = api.get("/openapi.json").json()
    form = spec["components"]["schemas"]["Body_search_v1_search_post"]["properties"]["k"]
    assert "Default 10, or RETRIEVAL_MAX_K when that is lower" in form["description"]


# -- 2. job filters ------------------------------------------------------------------------------------------

def test_a_job_status_or_kind_no_job_can_have_is_a_422_listing_the_accepted_ones(api: TestClient) -> None:
    status = refused(api.get("/v1/jobs", params={"status": "bogus"}))
    assert status["detail"][0]["loc"] == ["query", "status"]
    for accepted in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert accepted in status["message"]
    kind = refused(api.get("/v1/jobs", params={"kind": "bogus"}))
    assert kind["detail"][0]["loc"] == ["query", "kind"]
    assert all(name in kind["message"] for name in ("train", "rebuild_index", "reembed"))
    assert api.get("/v1/jobs", params={"status": "queued", "kind": "train"}).json() == {"jobs": []}


# -- 3. an empty label is no label -------------------------------------------------------------------------

def test_an_empty_label_is_no_label_in_every_route(api_on_each_db: TestClient) -> None:
    api = api_on_each_db
    everything = api.get("/v1/images").json()["total"]
    assert everything == CORPUS
    # In a query: no filter.
    assert api.get("/v1/images", params={"label": ""}).json()["total"] == everything
    assert len(results(api.get("/v1/images/1/similar", params={"label": "", "k": 5}))) == 5
    assert len(results(upload(api, query(), label="", k=5))) == 5
    assert len(results(api.post("/v1/search/recommend", data={"positive": "1", "label": "", "k": "5"}))) == 5
    # A real label still filters.
    assert {hit["label"] for hit in results(api.get("/v1/images/1/similar", params={"label": "red"}))} == {"red"}

    # Written: null, whichever way it is sent.
    added = upload(api, jpeg_bytes(class_image("green", 4242)), path="/v1/images", label="")
    assert added.status_code == 201, added.text
    image_id = added.json()["id"]
    try:
        assert added.json()["label"] is None
        assert api.patch(f"/v1/images/{image_id}", json={"label": "green"}).json()["label"] == "green"
        cleared = api.patch(f"/v1/images/{image_id}", json={"label": ""})
        assert cleared.status_code == 200 and cleared.json()["label"] is None
        assert api.get(f"/v1/images/{image_id}").json()["label"] is None
        assert api.get("/v1/images", params={"label": ""}).json()["total"] == everything + 1
    finally:
        assert api.delete(f"/v1/images/{image_id}").status_code == 204


# -- 4. unknown and repeated form fields -------------------------------------------------------------------

def test_an_unknown_form_field_is_a_422_naming_it_and_the_accepted_ones(api: TestClient) -> None:
    """`-F K=1` and `-F top_k=5` used to answer 10 results, as if they had not been sent."""
    misspelt = refused(upload(api, query(), K=1))
    assert misspelt["detail"]["unknown_fields"] == ["K"]
    assert "k" in misspelt["detail"]["accepted"] and "file" in misspelt["detail"]["accepted"]
    assert "unknown form field K (did you mean k?)" in misspelt["message"]
    other = refused(upload(api, query(), top_k=5))
    assert other["detail"]["unknown_fields"] == ["top_k"] and "top_k" in other["message"]
    assert {"k", "effort", "offset", "box", "meta"} <= set(other["detail"]["accepted"])  # the ranking options too

    typo = refused(upload(api, jpeg_bytes(class_image("green", 1)), path="/v1/images", lable="green"))
    assert typo["detail"]["unknown_fields"] == ["lable"] and "did you mean label?" in typo["message"]
    assert api.get("/v1/images").json()["total"] == CORPUS  # nothing was stored
    feedback = refused(api.post("/v1/search/recommend", data={"positive": "1", "postive": "2"}))
    assert feedback["detail"]["unknown_fields"] == ["postive"]

    # The fields a route takes still work, lists repeated.
    assert len(results(upload(api, query(), k=3, effort="exact", meta=["a=1", "b=2"]))) == 0  # no image has a, b
    assert len(results(api.post("/v1/search/recommend", data={"positive": ["1", "2"], "k": "3"}))) == 3


def test_a_second_file_or_a_repeated_option_is_a_422_not_the_last_one_silently(api: TestClient) -> None:
    red, blue = query(), jpeg_bytes(class_image("blue", 1))
    files = [("file", ("a.jpg", red, "image/jpeg")), ("file", ("b.jpg", blue, "image/jpeg"))]
    for path in ("/v1/search", "/v1/images"):
        two = refused(api.post(path, files=files))
        assert "one file per request" in two["message"] and two["detail"] == {"repeated_fields": {"file": 2}}
    assert api.get("/v1/images").json()["total"] == CORPUS
    twice = refused(api.post("/v1/search", files=files[:1], data={"k": ["3", "5"]}))
    assert twice["detail"] == {"repeated_fields": {"k": 2}} and "k (2 times)" in twice["message"]
    # Feedback takes several uploads by design.
    several = [("positive_file", ("a.jpg", red, "image/jpeg")), ("positive_file", ("b.jpg", blue, "image/jpeg"))]
    assert len(results(api.post("/v1/search/recommend", files=several, data={"k": "4"}))) == 4


# -- 5. the 413 names the configured image limit ------------------------------------------------------------

def test_a_too_large_upload_names_the_configured_image_limit(api: TestClient) -> None:
    """The 413 said "the limit of 265536 bytes": the body limit, multipart room included, which no one set."""
    body_limit = IMAGE_LIMIT + 64 * 1024
    declared = refused(upload(api, b"\xff" * (body_limit + 10_000)), 413)
    streamed = refused(api.post("/v1/search", content=iter([b"\xff" * 100_000] * 4),
                                headers={"content-type": "multipart/form-data; boundary=x"}), 413)
    for body in (declared, streamed):
        assert body["error"] == "payload_too_large"
        assert f"at most {IMAGE_LIMIT} bytes" in body["message"] and "RETRIEVAL_MAX_UPLOAD_BYTES" in body["message"]
        assert str(body_limit) not in body["message"]
        assert body["detail"]["max_upload_bytes"] == IMAGE_LIMIT
    assert declared["detail"]["request_bytes"] > body_limit
    assert "at least" in streamed["message"] and streamed["detail"]["request_bytes"] > body_limit
    # Between the two limits the decoder answers, with the same number.
    between = refused(upload(api, b"\xff\xd8" + b"\x00" * (IMAGE_LIMIT + 1000)), 413)
    assert f"the limit is {IMAGE_LIMIT} bytes" in between["message"]
    for body in (declared, streamed):
        assert set(body) == {"error", "message", "detail"}
    assert len(results(upload(api, query(), k=1))) == 1  # and the app still serves


# -- 6. JSON routes sent a form ---------------------------------------------------------------------------

def test_a_json_route_sent_a_form_answers_415_saying_json_is_expected(api: TestClient) -> None:
    """`curl -X PATCH -d label=x` (a form) got "Input should be a valid dictionary"."""
    form = refused(api.patch("/v1/images/1", data={"label": "renamed"}), 415)
    assert "takes a JSON body" in form["message"] and "application/x-www-form-urlencoded" in form["message"]
    assert "Content-Type: application/json" in form["message"]
    assert form["detail"] == {"content_type": "application/x-www-form-urlencoded", "accepted": ["application/json"]}
    untyped = refused(api.patch("/v1/images/1", content=json.dumps({"label": "renamed"})), 415)
    assert "without a Content-Type" in untyped["message"]
    assert api.get("/v1/images/1").json()["label"] != "renamed"  # nothing changed
    job = refused(api.post("/v1/jobs", data={"kind": "train"}), 415)
    assert "POST /v1/jobs takes a JSON body" in job["message"]
    assert api.get("/v1/jobs").json() == {"jobs": []}

    # JSON, and a +json type, still work.
    label = api.get("/v1/images/1").json()["label"]
    merge = api.patch("/v1/images/1", content=json.dumps({"label": label}),
                      headers={"content-type": "application/merge-patch+json"})
    assert merge.status_code == 200 and merge.json()["label"] == label
    assert api.patch("/v1/images/1", json={"metadata": {}}).status_code == 200
