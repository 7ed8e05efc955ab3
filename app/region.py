"""Region queries: `box=x0,y0,x1,y1` parsed, checked against the image and cropped before preprocessing.

Coordinates are pixels of the upright image (after EXIF rotation) as uploaded, or fractions of its width and
height when all four are at most 1 (so `0,0,1,1` is the whole image, `0.25,0.25,0.75,0.75` its centre).
Every bad box is a 422 whose detail names the `box` field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image as PILImage

from app.errors import ApiError

BOX_DOC = ("Search with a region of the query: `x0,y0,x1,y1` in pixels of the upright image, or as fractions "
           "of its width and height when all four are at most 1 (`0.1,0.1,0.6,0.6`).")


def _bad_box(message: str) -> ApiError:
    return ApiError(422, f"box: {message}", detail=[{"loc": ["body", "box"], "msg": message}])


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def relative(self) -> bool:
        return max(self.x0, self.y0, self.x1, self.y1) <= 1.0

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box in pixels of an upright image of this size; a 422 when it leaves the image."""
        if self.relative:
            return self.x0 * width, self.y0 * height, self.x1 * width, self.y1 * height
        if self.x1 > width or self.y1 > height:
            raise _bad_box(f"({self.x0:g},{self.y0:g},{self.x1:g},{self.y1:g}) reaches outside the "
                           f"{width}x{height} image")
        return self.x0, self.y0, self.x1, self.y1


def parse_box(text: str | None) -> Box | None:
    """`x0,y0,x1,y1` -> Box, or a 422 naming `box` (malformed, negative, zero area)."""
    if text is None or text.strip() == "":
        return None
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(parts) != 4 or len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise _bad_box(f"expected four numbers x0,y0,x1,y1, got {text[:80]!r}")
    box = Box(*values)
    if min(values) < 0:
        raise _bad_box("coordinates must not be negative")
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        raise _bad_box("x1 must be greater than x0 and y1 greater than y0 (the box has no area)")
    return box


def crop(image: PILImage.Image, box: Box) -> PILImage.Image:
    """The region of a decoded image. Pixel boxes refer to the upright full size (image.info['full_size']),
    so they stay right when the JPEG was decoded at a reduced scale."""
    full_w, full_h = image.info.get("full_size", image.size)
    x0, y0, x1, y1 = box.pixels(full_w, full_h)
    sx, sy = image.width / full_w, image.height / full_h
    left, top = math.floor(x0 * sx), math.floor(y0 * sy)
    right, bottom = max(left + 1, math.ceil(x1 * sx)), max(top + 1, math.ceil(y1 * sy))
    region = image.crop((left, top, min(right, image.width), min(bottom, image.height)))
    region.info["full_size"] = (round(x1 - x0), round(y1 - y0))
    # Where the region lies in the whole upload, as fractions: heatmaps over it are drawn on the whole image.
    region.info["region"] = (x0 / full_w, y0 / full_h, x1 / full_w, y1 / full_h)
    return region
