"""Issue 17's search features through a real uvicorn server, on SQLite and on PostgreSQL: near-duplicate groups and
the upload's reject mode, relevance feedback, diversity (crowding, MMR), region queries, effort, paging, and the
422s of their bad input. The default embedder (EfficientNet-Lite0, ImageNet weights) embeds generated pictures:
a random embedder cannot tell a resized copy from a different picture of the same colours.

The corpus: four colour classes (tests/conftest.py: class_image) indexed by a batch build on HNSW, then, through
POST /v1/images, "scenes" (random shapes on a background: distinct pictures, two palettes as their labels) and
made copies of three of them (JPEG re-encoded at quality 60, resized to 50%, 10% cropped)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tests.conftest import CLASS_COLOURS, DATABASES, class_image, jpeg_bytes, make_settings, migrated_url
from tests.live_server import LiveServer
from tests.test_api_helpers import start_server, upload

PALETTES = {"warm": [(200, 40, 30), (240, 150, 20), (250, 220, 60), (120, 30, 20)],
            "cool": [(20, 60, 200), (30, 170, 160), (120, 200, 240), (40, 40, 90)]}
DUPLICATED = (0, 1, 2)  # scenes that get made copies


def scene(palette: str, seed: int, size: int = 192) -> Image.Image:
    """A distinct picture: random ellipses and rectangles in one palette on a light background."""
    rng = np.random.default_rng(seed)
    colours = PALETTES[palette]
    image = Image.new("RGB", (size, size), (235, 232, 225))
    draw = ImageDraw.Draw(image)
    for _ in range(14):
        x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
        w, h = (int(v) for v in rng.integers(16, size // 2, 2))
        colour = colours[int(rng.integers(len(colours)))]
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1.2))


def made_copies(image: Image.Image) -> dict[str, bytes]:
    w, h = image.size
    dx, dy = round(w * 0.05), round(h * 0.05)
    return {"jpeg q60": jpeg_bytes(image, quality=60),
            "resize 50%": jpeg_bytes(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS), quality=90),
            "crop 10%": jpeg_bytes(image.crop((dx, dy, w - dx, h - dy)), quality=90)}


@dataclass
class Catalogue:
    server: LiveServer
    scenes: dict[int, int] = field(default_factory=dict)  # scene seed -> id of the original
    copies: dict[int, list[int]] = field(default_factory=dict)  # scene seed -> ids of its made copies
    by_label: dict[str, list[int]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.base_url

    def get(self, path: str, **params: object) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=60)

    def post(self, path: str, data: dict | None = None, files: list | None = None) -> httpx.Response:
        return httpx.post(self.url + path, data=data or {}, files=files, timeout=60)


def _add(server: LiveServer, data: bytes, label: str, **form: object) -> int:
    response = upload(server.base_url, data, path="/v1/images", label=label, **form)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture(scope="module", params=DATABASES)
def catalogue(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalogue]:
    from app.indexing import build_index

    tmp = tmp_path_factory.mktemp(f"features-{request.param}")
    url = migrated_url(request.param, request, tmp)
    corpus = tmp / "corpus"
    for label in CLASS_COLOURS:
        (corpus / label).mkdir(parents=True)
        for n in range(4):
            class_image(label, seed=500 * list(CLASS_COLOURS).index(label) + n, size=128).save(
                corpus / label / f"{n}.jpg", quality=92)
    settings = make_settings(tmp / "data", url, max_k=30)
    build_index(settings, corpus, factory="HNSW32", progress=False)
    server = start_server(settings, tmp / "server.log", max_k=30)
    cat = Catalogue(server)
    try:
        rows = httpx.get(f"{cat.url}/v1/images", params={"limit": 500}, timeout=30).json()["items"]
        for row in rows:
            cat.by_label.setdefault(row["label"], []).append(row["id"])
        for seed in range(8):
            palette = "warm" if seed % 2 == 0 else "cool"
            image = scene(palette, seed)
            shop = json.dumps({"shop": f"s{seed}"})
            cat.scenes[seed] = _add(server, jpeg_bytes(image, quality=92), palette, metadata=shop)
            cat.by_label.setdefault(palette, []).append(cat.scenes[seed])
            if seed in DUPLICATED:
                cat.copies[seed] = [_add(server, data, palette) for data in made_copies(image).values()]
                cat.by_label[palette] += cat.copies[seed]
        yield cat
    finally:
        server.stop()


def ids_of(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def test_near_duplicate_groups_and_reject_mode(catalogue: Catalogue) -> None:
    response = catalogue.get("/v1/duplicates")
    assert response.status_code == 200, response.text
    page = response.json()
    scene_ids = set(catalogue.scenes.values()) | {i for ids in catalogue.copies.values() for i in ids}
    groups = {frozenset(img["id"] for img in g["images"]): g for g in page["groups"]}
    expected = {frozenset([catalogue.scenes[s], *catalogue.copies[s]]) for s in DUPLICATED}
    # Every made copy is grouped with its original, and no two distinct pictures of one palette are grouped.
    # (The colour classes' images are one stripe pattern under different pixel noise: near-duplicates by any
    # measure, so they may group among themselves; they never join a scene's group.)
    assert {g for g in groups if g & scene_ids} == expected, (set(groups), expected, page)
    for seed in DUPLICATED:
        group = groups[frozenset([catalogue.scenes[seed], *catalogue.copies[seed]])]
        assert group["keeper_id"] == catalogue.scenes[seed]  # the original is the largest (the crop is smaller)
        assert group["images"][0]["id"] == group["keeper_id"]
        assert len(group["pairs"]) == 6 and all(p["score"] >= page["threshold"] for p in group["pairs"][:3])
    assert page["next_cursor"] is None

    # Paged one group at a time: the same groups, each once, then the end.
    seen, cursor = [], None
    for _ in range(len(groups) + 2):
        params = {"limit": 1} | ({"cursor": cursor} if cursor is not None else {})
        body = catalogue.get("/v1/duplicates", **params).json()
        seen += [frozenset(img["id"] for img in g["images"]) for g in body["groups"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen, key=min) == sorted(groups, key=min) and cursor is None

    # A fresh copy of scene 0 is refused in reject mode, naming the image it copies; allowed by default.
    copy = jpeg_bytes(scene("warm", 0).resize((150, 150)), quality=75)
    refused = upload(catalogue.url, copy, path="/v1/images", label="warm", on_near_duplicate="reject")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["error"] == "near_duplicate"
    assert body["detail"]["id"] in {catalogue.scenes[0], *catalogue.copies[0]}
    distinct = jpeg_bytes(scene("warm", 100), quality=92)
    accepted = upload(catalogue.url, distinct, path="/v1/images", label="warm", on_near_duplicate="reject")
    assert accepted.status_code == 201, accepted.text
    assert httpx.delete(f"{catalogue.url}/v1/images/{accepted.json()['id']}", timeout=30).status_code == 204


def test_recommend_moves_towards_positives_and_away_from_negatives(catalogue: Catalogue) -> None:
    red, yellow = catalogue.by_label["red"], catalogue.by_label["yellow"]
    labels = {i: label for label, ids in catalogue.by_label.items() for i in ids}

    plain = ids_of(catalogue.post("/v1/search/recommend", {"positive": [red[0]], "k": 12}))
    assert red[0] not in plain and [labels[i] for i in plain[:3]] == ["red"] * 3

    # Two positives of different classes: both classes lead the results.
    both = ids_of(catalogue.post("/v1/search/recommend", {"positive": [red[0], yellow[0]], "k": 6}))
    assert {labels[i] for i in both} >= {"red", "yellow"} and red[0] not in both and yellow[0] not in both

    # A negative pushes its class down: the nearest other class in the plain results ranks lower with one of its
    # images as a negative example.
    other = next(labels[i] for i in plain if labels[i] != "red")
    negative = catalogue.by_label[other][0]

    def other_ranks(ids: list[int]) -> list[int]:
        return [ids.index(i) if i in ids else len(ids) for i in catalogue.by_label[other] if i != negative]

    pushed = ids_of(catalogue.post("/v1/search/recommend", {"positive": [red[0]], "negative": [negative], "k": 12}))
    assert negative not in pushed and red[0] not in pushed
    assert sum(other_ranks(pushed)) > sum(other_ranks(plain)), (other, plain, pushed)

    # An uploaded positive works like a stored one.
    files = [("positive_file", ("q.jpg", jpeg_bytes(class_image("green", seed=4242, size=128)), "image/jpeg"))]
    uploaded = ids_of(catalogue.post("/v1/search/recommend", {"k": 3}, files=files))
    assert [labels[i] for i in uploaded] == ["green"] * 3


def test_crowding_and_mmr_still_fill_k(catalogue: Catalogue) -> None:
    labels = {i: label for label, ids in catalogue.by_label.items() for i in ids}
    query = jpeg_bytes(class_image("red", seed=9001, size=128))
    plain = ids_of(upload(catalogue.url, query, k=8))
    assert [labels[i] for i in plain[:4]] == ["red"] * 4  # without diversity one class fills the top

    one_each = ids_of(upload(catalogue.url, query, k=6, diversify="label", per_group=1))
    assert len(one_each) == 6 and len({labels[i] for i in one_each}) == 6  # 6 labels: 4 colours, 2 palettes
    two_each = ids_of(upload(catalogue.url, query, k=10, diversify="label", per_group=2))
    counts = [sum(labels[i] == label for i in two_each) for label in catalogue.by_label]
    assert len(two_each) == 10 and max(counts) == 2

    by_shop = ids_of(upload(catalogue.url, jpeg_bytes(scene("warm", 0)), k=5, diversify="meta:shop", per_group=1))
    assert len(by_shop) == 5  # the scenes have distinct shops; images without the key are their own group

    mmr = ids_of(upload(catalogue.url, query, k=8, mmr=0.3))
    assert len(mmr) == 8 and mmr[0] == plain[0]
    assert len({labels[i] for i in mmr}) > len({labels[i] for i in plain})
    # MMR pages come from one ordering: page 2 neither repeats nor skips what one longer page shows.
    page2 = ids_of(upload(catalogue.url, query, k=8, offset=8, mmr=0.3))
    assert mmr + page2 == ids_of(upload(catalogue.url, query, k=16, mmr=0.3))


def test_region_query_finds_the_pasted_picture(catalogue: Catalogue) -> None:
    collage = Image.new("RGB", (512, 384), (250, 250, 250))
    collage.paste(class_image("green", seed=77, size=256), (256, 0))
    collage.paste(class_image("blue", seed=78, size=256).resize((256, 128)), (0, 256))
    collage.paste(scene("cool", 3).resize((224, 224)), (16, 16))
    data = jpeg_bytes(collage, quality=92)
    family = {catalogue.scenes[3]}
    pixels = ids_of(upload(catalogue.url, data, k=1, box="16,16,240,240"))
    relative = ids_of(upload(catalogue.url, data, k=1, box="0.03125,0.0416,0.46875,0.625"))
    assert pixels[0] in family and relative[0] in family
    whole = ids_of(upload(catalogue.url, data, k=1))
    assert whole[0] not in family  # the crop is what found it


def test_effort_and_paging(catalogue: Catalogue) -> None:
    query = jpeg_bytes(class_image("blue", seed=31337, size=128))
    results = {effort: upload(catalogue.url, query, k=12, effort=effort).json()["results"]
               for effort in ("fast", "balanced", "exact")}
    exact_scores = [h["score"] for h in results["exact"]]
    assert exact_scores == sorted(exact_scores, reverse=True) and len(results["exact"]) == 12
    assert [h["id"] for h in results["balanced"]][:4] == [h["id"] for h in results["exact"]][:4]

    whole = ids_of(upload(catalogue.url, query, k=9, effort="exact"))
    page1 = upload(catalogue.url, query, k=3, effort="exact").json()
    page2 = upload(catalogue.url, query, k=3, offset=page1["next_offset"], effort="exact").json()
    page3 = upload(catalogue.url, query, k=3, offset=page2["next_offset"], effort="exact").json()
    assert [h["id"] for p in (page1, page2, page3) for h in p["results"]] == whole
    assert page1["next_offset"] == 3 and page2["next_offset"] == 6

    # min_score ends the pages where the scores drop below it.
    cut = results["exact"][5]["score"]
    first = upload(catalogue.url, query, k=4, min_score=cut, effort="exact").json()
    second = upload(catalogue.url, query, k=4, offset=4, min_score=cut, effort="exact").json()
    assert len(first["results"]) == 4 and len(second["results"]) == 2 and second["next_offset"] is None

    # Concurrent queries with different efforts each get what they get alone.
    alone = {e: [h["id"] for h in results[e]] for e in results}
    efforts = ["fast", "balanced", "exact"] * 6
    with ThreadPoolExecutor(max_workers=9) as pool:
        together = list(pool.map(lambda e: (e, ids_of(upload(catalogue.url, query, k=12, effort=e))), efforts))
    assert all(found == alone[effort] for effort, found in together)

    similar = catalogue.get(f"/v1/images/{whole[0]}/similar", k=3, offset=3, effort="fast")
    assert similar.status_code == 200 and whole[0] not in ids_of(similar)


def test_bad_input_is_422_naming_the_field(catalogue: Catalogue) -> None:
    image = class_image("red", seed=5, size=100)
    query = jpeg_bytes(image)
    some_id = catalogue.by_label["red"][0]
    cases = {
        "box outside": (upload(catalogue.url, query, box="10,10,200,50"), "box"),
        "box zero area": (upload(catalogue.url, query, box="10,10,10,50"), "box"),
        "box malformed": (upload(catalogue.url, query, box="1,2,three,4"), "box"),
        "box three numbers": (upload(catalogue.url, query, box="1,2,3"), "box"),
        "box negative": (upload(catalogue.url, query, box="-1,0,5,5"), "box"),
        "effort unknown": (upload(catalogue.url, query, effort="warp"), "effort"),
        "per_group zero": (upload(catalogue.url, query, diversify="label", per_group=0), "per_group"),
        "diversify unknown": (upload(catalogue.url, query, diversify="colour"), "diversify"),
        "mmr above 1": (upload(catalogue.url, query, mmr=1.5), "mmr"),
        "offset at max_k": (upload(catalogue.url, query, k=10, offset=30), "offset"),
        "similar effort": (catalogue.get(f"/v1/images/{some_id}/similar", effort="slow"), "effort"),
        "threshold above 1": (catalogue.get("/v1/duplicates", threshold=1.5), "threshold"),
        "threshold below -1": (catalogue.get("/v1/duplicates", threshold=-2), "threshold"),
        "unknown positive": (catalogue.post("/v1/search/recommend", {"positive": [some_id, 999_999]}), "positive"),
        "unknown negative": (catalogue.post("/v1/search/recommend", {"positive": [some_id], "negative": [88_888]}),
                             "negative"),
        "no positive": (catalogue.post("/v1/search/recommend", {"negative": [some_id]}), "positive"),
        "reject threshold": (upload(catalogue.url, query, path="/v1/images", on_near_duplicate="reject",
                                    near_duplicate_threshold=3), "near_duplicate_threshold"),
        "on_near_duplicate unknown": (upload(catalogue.url, query, path="/v1/images", on_near_duplicate="maybe"),
                                      "on_near_duplicate"),
    }
    for case, (response, name) in cases.items():
        assert response.status_code == 422, (case, response.status_code, response.text)
        body = response.json()
        assert body["error"] == "invalid_request" or body["error"], case
        assert any(name in map(str, d["loc"]) for d in body["detail"]), (case, body)
        assert name in body["message"], (case, body)
    assert "999999" in cases["unknown positive"][0].json()["message"]
    assert ids_of(upload(catalogue.url, query, k=1))  # still serving


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_duplicates_skip_deleted_images(catalogue: Catalogue, tmp_path: Path) -> None:
    original = scene("cool", 555)
    first = _add(catalogue.server, _png(original), "cool")
    second = _add(catalogue.server, jpeg_bytes(original, quality=60), "cool")
    groups = catalogue.get("/v1/duplicates").json()["groups"]
    assert any({first, second} == {i["id"] for i in g["images"]} for g in groups)
    assert httpx.delete(f"{catalogue.url}/v1/images/{second}", timeout=30).status_code == 204
    groups = catalogue.get("/v1/duplicates").json()["groups"]
    assert not any(first in {i["id"] for i in g["images"]} for g in groups)
    assert httpx.delete(f"{catalogue.url}/v1/images/{first}", timeout=30).status_code == 204
