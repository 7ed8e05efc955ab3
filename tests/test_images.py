"""The one decoder: every bad input gets a clear 4xx, every odd-but-valid image decodes upright to RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.images import ImageError, decode_image
from tests.conftest import class_image, jpeg_bytes


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_valid_jpeg_decodes_to_rgb() -> None:
    image = decode_image(jpeg_bytes(class_image("red", 1)))
    assert image.mode == "RGB" and image.size == (96, 96)


@pytest.mark.parametrize(
    ("data", "status", "phrase"),
    [
        (b"", 400, "empty"),
        (b"this is a text file that someone named photo.jpg\n", 415, "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, 415, "not an image"),  # a JPEG signature, no header
    ],
)
def test_non_images_are_rejected(data: bytes, status: int, phrase: str) -> None:
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.status == status
    assert phrase in err.value.message


def test_truncated_jpeg_is_rejected_not_padded() -> None:
    data = jpeg_bytes(class_image("blue", 2))
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.status == 400
    assert "truncated" in err.value.message


def test_pixel_bomb_is_rejected_before_decoding() -> None:
    # 50 megapixels of one colour compress to a few kB: the classic PNG bomb.
    bomb = encode(Image.new("1", (10_000, 5_000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as err:
        decode_image(bomb, max_pixels=40_000_000)
    assert err.value.status == 413
    assert "10000x5000" in err.value.message


def test_byte_limit() -> None:
    data = jpeg_bytes(class_image("green", 3))
    with pytest.raises(ImageError) as err:
        decode_image(data, max_bytes=len(data) - 1)
    assert err.value.status == 413


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I"])
def test_modes_become_rgb(mode: str) -> None:
    source = class_image("yellow", 4)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257)
    elif mode == "I":
        image = source.convert("L").convert("I")
    else:
        image = source.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I") else "PNG"
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB"
    # 16-bit data is rescaled, not clipped to white.
    grey = np.asarray(source.convert("L"), dtype=np.float32).mean()
    assert abs(np.asarray(decoded.convert("L"), dtype=np.float32).mean() - grey) < 12


@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1 / 255), (np.int32, 800)])
def test_scientific_tiffs_keep_their_picture(dtype: type, scale: float) -> None:
    """0..1 floats and 32-bit integers past 16 bits: scaled from their own range, not black or saturated."""
    grey = np.asarray(class_image("yellow", 4).convert("L"), dtype=np.float64)
    decoded = decode_image(encode(Image.fromarray((grey * scale).astype(dtype)), "TIFF"))
    assert np.corrcoef(np.asarray(decoded.convert("L"), dtype=np.float64).ravel(), grey.ravel())[0, 1] > 0.99


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(image, "PNG")))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)
    red, green, blue = np.asarray(decode_image(data))[8, 8].tolist()
    assert red > 200 and green < 40 and blue < 40


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def heic_bytes(image: Image.Image, orientation: int | None = None) -> bytes:
    """HEIC as a phone saves it (pillow-heif's encoder, a test dependency; the service reads with pi-heif)."""
    import pillow_heif

    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    pillow_heif.from_pillow(image).save(buf, quality=90, exif=exif.tobytes())
    return buf.getvalue()


def left_red_right_blue(width: int = 64, height: int = 32) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_a_heic_photo_held_upright_decodes_upright_once() -> None:
    """A phone held upright saves its sensor's landscape pixels and a 90-degree turn: the decoded picture is
    portrait, turned once (not again by the EXIF orientation the file also carries)."""
    decoded = decode_image(heic_bytes(left_red_right_blue(), orientation=6))
    assert decoded.mode == "RGB" and decoded.size == (32, 64) and decoded.info["full_size"] == (32, 64)
    top, bottom = np.asarray(decoded)[4, 16], np.asarray(decoded)[-4, 16]
    assert top[0] > 200 and top[2] < 60  # turned clockwise: the left (red) half is on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_avif_decodes() -> None:
    decoded = decode_image(encode(left_red_right_blue(), "AVIF", quality=90))
    assert decoded.size == (64, 32) and np.asarray(decoded)[16, 8, 0] > 200


def test_heic_guards_are_the_same_as_for_any_image() -> None:
    data = heic_bytes(left_red_right_blue())
    with pytest.raises(ImageError) as err:  # the pixel count comes from the header, before decoding
        decode_image(data, max_pixels=1000)
    assert err.value.status == 413 and "64x32" in err.value.message
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(ImageError) as err:
            decode_image(data[:cut])
        assert err.value.status == 400, err.value.message
