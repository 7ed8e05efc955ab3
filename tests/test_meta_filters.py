"""Metadata filters (`meta=key=value`) through the app in-process, on SQLite and on PostgreSQL: one image added
with booleans, numbers written in several ways, a null and awkward keys, then found (or not) through the list
route and through search, where the filter picks FAISS's allowed ids. The rule is docs/api.md's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import DATABASES, class_image, jpeg_bytes, migrated_url
from tests.test_api_helpers import app_client, build_served_corpus, upload

# Stored as the JSON text below: `1e20` and `2.5` as written, the integers as Python writes them.
METADATA = ('{"flag": true, "off": false, "big": 1e20, "ratio": 2.5, "year": 2021, "whole": 3.0, "none": null, '
            '"id": 9007199254740993, "huge": 100000000000000000000000000000, "word": "true", "digits": "007", '
            '"sp ace": "yes", "a.b": "dotted", "q\\"uote": "q", "nested": {"x": 1}, "color": "navy"}')

# key -> (filter values that find the image, values that do not)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "flag": (["true"], ["1", "True", "false", "yes", ""]),
    "off": (["false"], ["0", "true", "null"]),
    "big": (["1e20", "1e+20", "1.0e+20", "100000000000000000000", "1E20", "+1e20"], ["1e+2", "1e21", "1.0e+20 "]),
    "ratio": (["2.5", "2.50", "25e-1", "+2.5"], ["2", "3", "2.5.0"]),
    "year": (["2021", "2021.0", "2.021e3"], ["2022", "2021a", " 2021"]),
    "whole": (["3", "3.0", "3e0"], ["3.1", "4"]),
    "none": (["null"], ["", "None", "0", "false"]),
    # Integers that fit in 64 bits compare exactly, past 2^53 too (as floats these two would be equal).
    "id": (["9007199254740993"], ["9007199254740992"]),
    "huge": (["1e29", "100000000000000000000000000000"], ["1e28"]),
    "word": (["true"], ["false"]),  # the string "true" still matches as written
    "digits": (["007"], ["7"]),  # a string never compares as a number
    "sp ace": (["yes"], ["no"]),
    "a.b": (["dotted"], []),  # the key is taken verbatim, not as a path
    'q"uote': (["q"], []),
    "nested": ([], ['{"x": 1}', '{"x":1}', "1"]),  # objects match nothing
    "color": (["navy"], ["Navy", "navy "]),
    "missing": ([], ["", "null", "navy"]),
}


@pytest.fixture(scope="module", params=DATABASES)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[TestClient, int]]:
    """An app over a small corpus with one more image carrying METADATA, and that image's id."""
    tmp = tmp_path_factory.mktemp(f"meta-{request.param}")
    settings = build_served_corpus(tmp, migrated_url(request.param, request, tmp), per_class=2)
    with app_client(settings) as client:
        created = upload(client, jpeg_bytes(class_image("blue", seed=777)), path="/v1/images", metadata=METADATA)
        assert created.status_code == 201, created.text
        assert created.json()["metadata"] == json.loads(METADATA)
        yield client, created.json()["id"]


def listed(client: TestClient, *meta: str) -> list[int]:
    response = client.get("/v1/images", params={"meta": list(meta)})
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


@pytest.mark.parametrize("key", list(CASES))
def test_each_json_type_matches_as_written(served: tuple[TestClient, int], key: str) -> None:
    client, image_id = served
    matching, other = CASES[key]
    found = {value: listed(client, f"{key}={value}") for value in matching + other}
    assert found == {value: [image_id] if value in matching else [] for value in matching + other}


def test_search_filters_pick_the_same_images(served: tuple[TestClient, int]) -> None:
    client, image_id = served
    query = jpeg_bytes(class_image("red", seed=5))  # not the image itself: only the filter can bring it back

    def searched(*meta: str) -> list[int]:
        response = upload(client, query, k=5, meta=list(meta))
        assert response.status_code == 200, response.text
        return [hit["id"] for hit in response.json()["results"]]

    assert searched("flag=true") == [image_id]
    # A key a filter addresses is one results can be spread over, too.
    spread = upload(client, query, k=5, diversify="meta:sp ace", per_group=1)
    assert spread.status_code == 200, spread.text
    assert searched("flag=true", "big=1e+20", "sp ace=yes", "year=2021") == [image_id]
    assert searched("flag=1") == []
    assert searched("flag=true", "big=1e21") == []
    assert client.get(f"/v1/images/{image_id - 1}/similar", params={"k": 5, "meta": "ratio=2.50"}).json()[
        "results"][0]["id"] == image_id


def test_keys_the_filter_cannot_address_are_refused(served: tuple[TestClient, int]) -> None:
    client, image_id = served
    # The key of a filter ends at its first '=': the rest is the value, '=' included.
    assert listed(client, "color=navy=dark") == []
    assert client.get("/v1/images", params={"meta": "color"}).status_code == 422

    refused = upload(client, jpeg_bytes(class_image("green", seed=778)), path="/v1/images",
                     metadata='{"ok": 1, "a=b": 2}')
    assert refused.status_code == 422 and refused.json()["detail"] == {"keys": ["a=b"]}
    assert "'a=b'" in refused.json()["message"]
    too_big = upload(client, jpeg_bytes(class_image("green", seed=779)), path="/v1/images",
                     metadata='{"far": 1e400}')
    assert too_big.status_code == 422 and too_big.json()["detail"] == {"keys": ["far"]}

    patched = client.patch(f"/v1/images/{image_id}", json={"metadata": {"x=y": 1}})
    assert patched.status_code == 422 and patched.json()["detail"] == {"keys": ["x=y"]}
    assert client.get(f"/v1/images/{image_id}").json()["metadata"] == json.loads(METADATA)
    # Removing such a key (null) is still allowed: it may predate the rule.
    assert client.patch(f"/v1/images/{image_id}", json={"metadata": {"x=y": None}}).status_code == 200
    # A patched value is filtered by the same rule.
    assert client.patch(f"/v1/images/{image_id}", json={"metadata": {"sp ace": 4.0}}).status_code == 200
    assert listed(client, "sp ace=4") == [image_id] and listed(client, "sp ace=yes") == []
    assert client.patch(f"/v1/images/{image_id}", json={"metadata": {"sp ace": "yes"}}).status_code == 200
