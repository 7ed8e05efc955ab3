"""The one safe image decoder: bytes -> RGB PIL image, or an ImageError that says what was wrong.

Every path that turns bytes into pixels (uploads, the batch index job, the worker, training and evaluation) goes
through `decode_image`; models/ gets it as a `load_image` function from `file_loader(settings)`.
Guards, in order: empty input, byte limit, format sniffing, pixel count read from the header before any pixel is
decoded (decompression bombs), a full decode that fails loudly on truncated data, then EXIF orientation and a
mode conversion that keeps 16-bit and transparent images looking right.

Formats: Pillow's own, AVIF included, plus HEIC/HEIF (what phones save by default) through pi-heif, the
decode-only build of pillow-heif; it applies the file's rotation and mirroring itself and resets the EXIF
orientation to 1, so nothing is turned twice.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pi_heif import register_heif_opener
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from app.settings import Settings

# Truncated files must fail, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel limit (max_pixels, from the header, before any pixel is decoded) replaces Pillow's, which reads
# the same header: with it off Pillow raises no DecompressionBombWarning, so no thread changes the warning filters.
Image.MAX_IMAGE_PIXELS = None
# Only the primary picture is embedded: a portrait photo's depth map, the thumbnails and the auxiliary images
# (HDR gain maps) are not read into every decoded image's info.
register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

# What the decoder reads, for messages and docs; the suffixes a folder build picks up are models.data's.
FORMATS_READ = "JPEG, PNG, GIF, WebP, AVIF, HEIC/HEIF, BMP, TIFF"
# ISO base media files (HEIC, HEIF, AVIF) start with an 'ftyp' box naming one of these brands.
_ISOBMFF_IMAGE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")

ORIENTATION_TAG = 0x0112
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass
class ImageError(Exception):
    """A client-side problem with an image; `status` is the HTTP status the API answers with."""

    status: int
    message: str

    def __str__(self) -> str:
        return self.message


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Scale high-bit-depth greys into 8 bits instead of letting Pillow clip everything above 255, to the
        # range they were written in: 16-bit; 8, 16 or 32-bit values in a 32-bit file; 0..1 floats (scientific
        # and HDR TIFFs), which a 0..255 scale would turn black.
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        top = array.max(initial=0)
        if mode.startswith("I;16"):
            peak = 65535.0
        elif mode == "F" and top <= 1.0:
            peak = 1.0
        else:
            peak = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparency onto white, the way the image looks on a page.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image or raise ImageError (4xx).

    `min_side`: the caller only needs the shorter side this long (an embedder's resize), so a JPEG may be decoded
    at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's draft mode) as long as both sides stay >= min_side: a
    12-megapixel photo then costs a fraction of a full decode. Queries and index builds pass the same value.
    The image's upright size before any such scaling is in `info["full_size"]`."""
    if not data:
        raise ImageError(400, "the upload is empty: expected image bytes")
    if len(data) > max_bytes:
        raise ImageError(413, f"the image is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[4:8] == b"ftyp" and data[8:12] in _ISOBMFF_IMAGE_BRANDS:  # the format is right, its content is not
            raise ImageError(400, "the HEIC/HEIF/AVIF image is truncated or corrupt and could not be read") from None
        raise ImageError(415, f"the file is not an image in a format this service reads ({FORMATS_READ})") from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise ImageError(400, f"the image header could not be read: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(400, f"the image has invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            413, f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    try:
        if min_side is not None and image.format == "JPEG":
            image.draft(image.mode, (min_side, min_side))
        if getattr(image, "is_animated", False):
            image.seek(0)  # animated GIF / WebP / APNG: the first frame
        image.load()
        # Upright full size, whatever draft decoded: EXIF orientations 5-8 turn the picture by 90 degrees.
        orientation = image.getexif().get(ORIENTATION_TAG)
        full_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        if orientation in (2, 3, 4, 5, 6, 7, 8):  # else exif_transpose would only copy the pixels
            image = ImageOps.exif_transpose(image) or image
        rgb = _to_rgb(image)
        rgb.load()
        rgb.info["full_size"] = full_size
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(400, f"the image is truncated or corrupt and could not be decoded: {exc}") from None
    return rgb


def read_image_file(path: str, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                    min_side: int | None = None) -> Image.Image:
    """Decode a file from disk with the same guards as an upload (the size is checked before reading)."""
    import os

    size = os.path.getsize(path)
    if size > max_bytes:
        raise ImageError(413, f"{path} is {size} bytes; the limit is {max_bytes} bytes")
    with open(path, "rb") as handle:
        return decode_image(handle.read(), max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side)


def file_loader(settings: Settings) -> Callable[[str], Image.Image]:
    """`read_image_file` with the settings' limits: the `load_image` that models/ datasets, training and evaluation
    take (a partial, so DataLoader worker processes can pickle it)."""
    return functools.partial(
        read_image_file, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels
    )
