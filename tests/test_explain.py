"""Why did this match: per-location features and heatmaps (models/explain.py) for every arch, a distinctive patch
heating up where it is, ABE/OSME masks per learner/part, and the API (GET /v1/images/{id}/explain, explain=true on
a search) on images indexed by a build and added through the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.explain import crop_box
from app.settings import Settings
from models.embedder import EmbedderConfig
from models.explain import local_features, mass_inside, pair_maps
from models.zoo import create_embedder
from tests.conftest import class_image, jpeg_bytes, migrated_url
from tests.test_api_helpers import app_client, build_served_corpus, upload

TINY = {"backbone": "resnet10t", "dim": 32, "image_size": 64, "resize_size": 64}
ARCHS = {
    "timm": {**TINY},
    "irt_cnn": {**TINY, "arch": "irt", "pooling": "gem", "extra": {"projection": "linear"}},
    "irt_vit": {"arch": "irt", "backbone": "vit_tiny_patch16_224", "dim": 32, "image_size": 64, "resize_size": 64,
                "pooling": "cls", "extra": {"projection": "linear", "backbone_kwargs": {"img_size": 64}}},
    "abe": {**TINY, "arch": "abe", "extra": {"num_learners": 2, "split_stage": 1}},
    "osme": {**TINY, "arch": "osme", "extra": {"num_parts": 4}},
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_local_features_give_the_embedding_and_cosine_maps(name: str) -> None:
    torch.manual_seed(0)
    embedder = create_embedder(EmbedderConfig.from_dict({"arch": "timm", **ARCHS[name]})).eval()
    pixels = torch.randn(3, 3, 64, 64)
    features = local_features(embedder, pixels)
    with torch.no_grad():
        assert torch.allclose(features.embedding, embedder(pixels), atol=1e-5)  # the same pass the search uses
    assert features.local.shape[:2] == (3, 32)
    assert torch.allclose(features.local.norm(dim=1), torch.ones(features.local.shape[0], *features.local.shape[2:]),
                          atol=1e-4)
    maps = pair_maps(local_features(embedder, pixels[:1]), features)
    h, w = features.local.shape[2:]
    assert maps.query.shape == maps.result.shape == (3, h, w)
    assert maps.query.min() >= -1 and maps.query.max() <= 1 and maps.result.abs().max() <= 1
    assert maps.scores[0] == pytest.approx(1.0, abs=1e-4)  # the query against itself
    if name == "irt_vit":
        assert (h, w) == (4, 4)  # 64 px / patch 16
    if name in ("abe", "osme"):
        parts = 2 if name == "abe" else 4
        assert features.masks is not None and features.masks.shape[:2] == (3, parts)
        assert features.masks.min() >= 0 and features.masks.max() <= 1
    else:
        assert features.masks is None


def patch_image(background: tuple[int, int, int], corner: tuple[int, int], seed: int, size: int = 224) -> Image.Image:
    """A plain noisy background with one distinctive patch (a red/yellow checkerboard) at `corner` (x, y)."""
    rng = np.random.default_rng(seed)
    img = np.tile(np.array(background, dtype=np.float32), (size, size, 1)) + rng.normal(0, 6, (size, size, 3))
    x, y = corner
    checker = (np.indices((64, 64)).sum(axis=0) // 8) % 2
    img[y : y + 64, x : x + 64] = np.where(checker[..., None] == 1, [230, 30, 30], [240, 220, 40])
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_a_distinctive_patch_heats_where_it_is() -> None:
    """Lite0 (ImageNet weights): the query has the patch top-left on grey, the result the same patch bottom-right
    on blue. Each image's heatmap peaks on its own patch and puts more of its mass there than the patch's share."""
    embedder = create_embedder("efficientnet_lite0")
    # Resize to 224 (no crop), so patch coordinates in the image are coordinates in the model's input.
    config_crop = EmbedderConfig.from_dict({**embedder.config.to_dict(), "resize_size": 224, "pretrained": "none"})
    query = patch_image((128, 128, 128), (16, 16), seed=1)
    result = patch_image((40, 60, 170), (144, 144), seed=2)
    from models.embedder import eval_transform

    to_pixels = eval_transform(config_crop)
    pixels = torch.stack([to_pixels(query), to_pixels(result)])
    features = local_features(embedder, pixels)
    one = type(features)(features.embedding[:1], features.local[:1])
    other = type(features)(features.embedding[1:], features.local[1:])
    maps = pair_maps(one, other)
    h, w = maps.query.shape[1:]
    query_peak = divmod(int(maps.query[0].argmax()), w)
    result_peak = divmod(int(maps.result[0].argmax()), w)
    assert query_peak[0] < h // 2 and query_peak[1] < w // 2, maps.query[0]
    assert result_peak[0] >= h // 2 and result_peak[1] >= w // 2, maps.result[0]
    patch_share = (64 / 224) ** 2
    assert mass_inside(maps.query[0], (16 / 224, 16 / 224, 80 / 224, 80 / 224)) > 1.5 * patch_share
    assert mass_inside(maps.result[0], (144 / 224, 144 / 224, 208 / 224, 208 / 224)) > 1.5 * patch_share


def test_mass_inside_and_crop_box_by_hand() -> None:
    heat = torch.tensor([[1.0, 0.0], [0.0, 3.0]]) + 0.5  # heat counts above the coldest cell
    assert mass_inside(heat, (0.5, 0.5, 1.0, 1.0)) == pytest.approx(0.75)
    assert mass_inside(heat, (0.0, 0.0, 0.75, 0.75)) == pytest.approx((1 + 3 * 0.25) / 4)
    config = EmbedderConfig(image_size=224, resize_size=256)
    # 512 x 256: resized to 512 x 256... shorter side 256 -> scale 1; crop 224 of 512 wide, 224 of 256 high.
    assert crop_box(512, 256, config) == pytest.approx([0.2812, 0.0625, 0.7188, 0.9375], abs=1e-4)


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("explain")
    return build_served_corpus(tmp, migrated_url("sqlite", request, tmp), per_class=3)


def test_explain_endpoint_on_built_and_api_added_images(served: Settings) -> None:
    with app_client(served) as client:
        stored = client.get("/v1/images", params={"limit": 100}).json()["items"]
        added = upload(client, jpeg_bytes(class_image("red", seed=99, size=120)), path="/v1/images", label="red")
        assert added.status_code == 201, added.text
        new_id = added.json()["id"]
        response = client.get(f"/v1/images/{stored[0]['id']}/explain", params={"query_id": new_id})
        assert response.status_code == 200, response.text
        body = response.json()
        h, w = body["grid"]
        assert body["query"]["id"] == new_id and body["result"]["id"] == stored[0]["id"]
        for side in ("query", "result"):
            heat = np.array(body[side]["heatmap"])
            assert heat.shape == (h, w) and heat.min() >= -1 and heat.max() <= 1
            assert body[side]["masks"] is None and len(body[side]["crop"]) == 4
        assert -1 <= body["score"] <= 1
        for params, missing in (({"query_id": new_id}, 10**9), ({"query_id": 10**9}, stored[0]["id"])):
            target = 10**9 if missing == 10**9 else stored[0]["id"]
            gone = client.get(f"/v1/images/{target}/explain", params=params)
            assert gone.status_code == 404 and "10000000" in gone.json()["message"]
        assert client.get(f"/v1/images/{new_id}/explain").status_code == 422  # no query_id
        assert client.delete(f"/v1/images/{new_id}").status_code == 204
        deleted = client.get(f"/v1/images/{stored[0]['id']}/explain", params={"query_id": new_id})
        assert deleted.status_code == 404 and deleted.json()["error"]


def test_search_with_explain_returns_maps_for_the_results_shown(served: Settings, tmp_path: Path) -> None:
    query = jpeg_bytes(class_image("blue", seed=7, size=100))
    with app_client(served) as client:
        plain = client.post("/v1/search", files={"file": ("q.jpg", query, "image/jpeg")}, data={"k": "4"}).json()
        assert plain["explain"] is None
        response = upload(client, query, k=4, explain="true")
        assert response.status_code == 200, response.text
        body = response.json()
    assert [r["id"] for r in body["results"]] == [r["id"] for r in plain["results"]]
    explain = body["explain"]
    assert [r["id"] for r in explain["results"]] == [r["id"] for r in body["results"]] and not explain["unexplained"]
    h, w = explain["grid"]
    for hit, result in zip(body["results"], explain["results"], strict=True):
        assert np.array(result["query_heatmap"]).shape == (h, w)
        assert np.array(result["result"]["heatmap"]).shape == (h, w)
        assert result["score"] == pytest.approx(hit["score"], abs=1e-3)  # torch pass vs the served runtime
    assert explain["query"]["crop"] == pytest.approx([0.0, 0.0, 1.0, 1.0]) and explain["explain_ms"] > 0

    # A box query's maps lie on the box, given as fractions of the whole upload (the page draws them there).
    with app_client(served) as client:
        boxed = upload(client, query, k=2, explain="true", box="0.5,0,1,0.5").json()["explain"]
    assert boxed["query"]["crop"] == pytest.approx([0.5, 0.0, 1.0, 0.5], abs=1e-3)


def test_an_abe_model_served_returns_its_attention_masks_per_learner(request: pytest.FixtureRequest,
                                                                     tmp_path: Path) -> None:
    """An ABE-M checkpoint as the active model: the explain endpoint gives one mask per learner for both images."""
    from app.indexing import build_index
    from models.checkpoint import save_checkpoint
    from tests.conftest import make_settings
    from tests.test_indexing import make_corpus

    torch.manual_seed(0)
    abe = create_embedder(EmbedderConfig.from_dict({**ARCHS["abe"], "arch": "abe", "pooling": "avg"}))
    save_checkpoint(abe.eval(), tmp_path / "abe")
    url = migrated_url("sqlite", request, tmp_path)
    settings = make_settings(tmp_path / "data", url, embedder=str(tmp_path / "abe"))
    build_index(settings, make_corpus(tmp_path / "corpus", 2), progress=False)
    with app_client(settings) as client:
        ids = [image["id"] for image in client.get("/v1/images", params={"limit": 10}).json()["items"]]
        body = client.get(f"/v1/images/{ids[1]}/explain", params={"query_id": ids[0]}).json()
        searched = upload(client, jpeg_bytes(class_image("green", seed=5)), k=2, explain="true").json()
    h, w = body["mask_grid"]
    for side in ("query", "result"):
        masks = np.array(body[side]["masks"])
        assert masks.shape == (2, h, w) and masks.min() >= 0 and masks.max() <= 1  # one per learner
    assert np.array(searched["explain"]["query"]["masks"]).shape == (2, h, w)
    assert all(np.array(r["result"]["masks"]).shape == (2, h, w) for r in searched["explain"]["results"])


def test_explain_requests_get_the_overload_503_past_their_admission_limit(served: Settings) -> None:
    """Heatmaps bypass the batcher, so they have an admission limit of their own (RETRIEVAL_EXPLAIN_MAX_*): past
    it an explain request, on a search or on the explain route, gets the batcher's 503 JSON with Retry-After at
    once, while plain searches still answer; a flood gets only 200s and those 503s, and leaves nothing admitted."""
    from concurrent.futures import ThreadPoolExecutor

    query = jpeg_bytes(class_image("blue", seed=7, size=100))
    with app_client(served, explain_max_concurrent=1, explain_max_queue=0) as client:
        gate = client.app.state.explain_gate
        ids = [item["id"] for item in client.get("/v1/images", params={"limit": 2}).json()["items"]]
        held = gate.admit()
        client.portal.call(held.__aenter__)  # one explain request in flight: the limit is reached
        try:
            refused = [upload(client, query, k=2, explain="true"),
                       client.get(f"/v1/images/{ids[0]}/explain", params={"query_id": ids[1]})]
            for response in refused:
                assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
                body = response.json()
                assert body["error"] == "overloaded" and "explain requests" in body["message"], body
            assert upload(client, query, k=2).status_code == 200  # plain searches are not held up
        finally:
            client.portal.call(held.__aexit__, None, None, None)
        assert upload(client, query, k=2, explain="true").status_code == 200
        with ThreadPoolExecutor(8) as pool:
            flood = list(pool.map(lambda _: upload(client, query, k=2, explain="true"), range(16)))
        assert {r.status_code for r in flood} <= {200, 503} and any(r.status_code == 200 for r in flood)
        assert all(r.json()["error"] == "overloaded" for r in flood if r.status_code == 503)
        assert gate.admitted == 0
