"""Why did this match: similarity heatmaps for a query and its results (GET /v1/images/{id}/explain, and
`explain=true` on POST /v1/search).

The maps come from the model version's torch embedder (`Deployment.torch_embedder`: an exported ONNX/OpenVINO
runtime gives only the pooled embedding), through models/explain.py: the query's local features come from one
forward pass whose embedding is also what the search uses, so the query is never run twice; the results shown get
one batched forward pass. Each map is over the model's input crop of its image (`crop`: where that crop lies in
the original image, as fractions), a [h][w] grid of cosines in [-1, 1].
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image as PILImage

from app.deployment import Deployment
from app.errors import ApiError
from app.schemas import ExplainResponse, ImageExplanation, ResultExplanation, SearchExplanation
from app.serving import StageClock, decode_query
from app.settings import Settings
from models.embedder import EmbedderConfig, LocalFeatures
from models.explain import local_features, pair_maps

DECIMALS = 3


@dataclass
class Decoded:
    """An image as the model sees it, and the part of it that is: its input crop's box."""

    pixels: torch.Tensor
    crop: list[float]


def crop_box(width: int, height: int, config: EmbedderConfig) -> list[float]:
    """[x0, y0, x1, y1], fractions of the image, of the centre crop the eval transform takes (resize the shorter
    side to resize_size, crop image_size): where a heatmap lies on the original image."""
    scale = config.resize_size / min(width, height)
    crop_w = min(1.0, config.image_size / (width * scale))
    crop_h = min(1.0, config.image_size / (height * scale))
    x0, y0 = (1 - crop_w) / 2, (1 - crop_h) / 2
    return [round(v, 4) for v in (x0, y0, x0 + crop_w, y0 + crop_h)]


def decode_for_explain(deployment: Deployment, image: PILImage.Image, pixels: torch.Tensor) -> Decoded:
    box = crop_box(image.width, image.height, deployment.runner.config)
    if "region" in image.info:  # a box query: the crop is a part of the region, which is a part of the upload
        rx0, ry0, rx1, ry1 = image.info["region"]
        box = [round(rx0 + box[0] * (rx1 - rx0), 4), round(ry0 + box[1] * (ry1 - ry0), 4),
               round(rx0 + box[2] * (rx1 - rx0), 4), round(ry0 + box[3] * (ry1 - ry0), 4)]
    return Decoded(pixels, box)


def read_stored(deployment: Deployment, uri: str, settings: Settings) -> Decoded | None:
    """A stored image's file decoded as an upload of it would be; None when the file is gone or unreadable."""
    try:
        with open(uri.removeprefix("file://"), "rb") as handle:
            data = handle.read()
        image, pixels = decode_query(deployment, data, settings, StageClock())
    except (OSError, ApiError, ValueError):
        return None
    return decode_for_explain(deployment, image, pixels)


def forward_local(deployment: Deployment, pixels: torch.Tensor) -> LocalFeatures:
    """Local features of a preprocessed batch; a 422 naming the model when its arch cannot give them."""
    try:
        return local_features(deployment.torch_embedder(), pixels)
    except NotImplementedError as exc:
        raise ApiError(422, f"model version {deployment.model_name} cannot explain matches: {exc}") from None


def _grid(values: torch.Tensor) -> list:
    return torch.round(values, decimals=DECIMALS).tolist()


def image_explanation(image_id: int | None, decoded: Decoded, features: LocalFeatures, row: int,
                      heatmap: torch.Tensor | None) -> ImageExplanation:
    masks = None if features.masks is None else _grid(features.masks[row])
    return ImageExplanation(id=image_id, crop=decoded.crop, heatmap=None if heatmap is None else _grid(heatmap),
                            masks=masks)


def grids(features: LocalFeatures) -> dict[str, list[int] | None]:
    """The [h, w] of the heatmaps and of the masks (None without masks)."""
    masks = features.masks
    return {"grid": list(features.local.shape[-2:]), "mask_grid": None if masks is None else list(masks.shape[-2:])}


def explain_pair(deployment: Deployment, query_id: int, query: Decoded, result_id: int,
                 result: Decoded) -> ExplainResponse:
    """Two stored images: one forward pass over both."""
    started = time.perf_counter()
    features = forward_local(deployment, torch.stack([query.pixels, result.pixels]))
    first = LocalFeatures(features.embedding[:1], features.local[:1],
                          None if features.masks is None else features.masks[:1])
    second = LocalFeatures(features.embedding[1:], features.local[1:],
                           None if features.masks is None else features.masks[1:])
    maps = pair_maps(first, second)
    return ExplainResponse(
        model_version=deployment.model_name,
        **grids(features),
        score=round(float(maps.scores[0]), 4),
        query=image_explanation(query_id, query, first, 0, maps.query[0]),
        result=image_explanation(result_id, result, second, 0, maps.result[0]),
        explain_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def explain_results(deployment: Deployment, query: Decoded, query_features: LocalFeatures,
                    results: list[tuple[int, Decoded | None]]) -> SearchExplanation:
    """Heatmaps of the query against each result (one forward pass over the results whose file reads)."""
    started = time.perf_counter()
    readable = [(image_id, decoded) for image_id, decoded in results if decoded is not None]
    explained: list[ResultExplanation] = []
    if readable:
        features = forward_local(deployment, torch.stack([d.pixels for _, d in readable]))
        maps = pair_maps(query_features, features)
        for row, (image_id, decoded) in enumerate(readable):
            explained.append(ResultExplanation(
                id=image_id,
                score=round(float(maps.scores[row]), 4),
                query_heatmap=_grid(maps.query[row]),
                result=image_explanation(image_id, decoded, features, row, maps.result[row]),
            ))
    return SearchExplanation(
        **grids(query_features),
        query=image_explanation(None, query, query_features, 0, None),
        results=explained,
        unexplained=[image_id for image_id, decoded in results if decoded is None],
        explain_ms=round((time.perf_counter() - started) * 1000, 2),
    )


__all__ = ["Decoded", "crop_box", "decode_for_explain", "explain_pair", "explain_results", "forward_local",
           "read_stored"]
