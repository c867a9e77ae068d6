"""Tests for ``service.engine.imaging.images``: decoding uploads safely into RGB."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from service.engine.imaging.images import (
    ACCEPTED_FORMATS,
    UPLOAD_FORMATS,
    DecodedImage,
    ImageLimits,
    decode_image,
)
from service.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError

REPO_ROOT = Path(__file__).resolve().parents[3]
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    """Save ``im`` in ``fmt`` to bytes."""
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def pixels(decoded: DecodedImage) -> np.ndarray:
    """The decoded image as an HxWx3 uint8 array."""
    return np.asarray(decoded.image)


def blocks_image(width: int = 24, height: int = 16) -> Image.Image:
    """Four solid quadrants (red, green, blue, white): few colours, so GIF stores it exactly."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[: height // 2, : width // 2] = RED
    arr[: height // 2, width // 2 :] = GREEN
    arr[height // 2 :, : width // 2] = BLUE
    arr[height // 2 :, width // 2 :] = WHITE
    return Image.fromarray(arr)


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_with_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR declares ``width`` x ``height`` but holds almost no data."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --- accepted formats ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "mean_tolerance"),
    [
        ("JPEG", {"quality": 95, "subsampling": 0}, 3.0),  # lossy: ringing at edges
        ("PNG", {}, 0.0),
        ("BMP", {}, 0.0),
        ("TIFF", {}, 0.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("GIF", {}, 0.0),
    ],
)
def test_every_accepted_format_round_trips_to_rgb(
    fmt: str, params: dict[str, Any], mean_tolerance: float
) -> None:
    original = blocks_image()
    decoded = decode_image(encode(original, fmt, **params))
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == original.size == decoded.image.size
    diff = np.abs(pixels(decoded).astype(int) - np.asarray(original).astype(int))
    assert diff.mean() <= mean_tolerance


def test_accepted_formats_are_the_documented_six() -> None:
    assert ACCEPTED_FORMATS == ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")


def test_animated_gif_decodes_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3  # really animated
    decoded = decode_image(data)
    assert decoded.format == "GIF"
    assert (pixels(decoded) == RED).all()


def test_multi_picture_jpeg_from_a_camera_is_accepted_as_jpeg() -> None:
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    decoded = decode_image(data)
    assert decoded.format == "JPEG"
    assert np.abs(pixels(decoded).astype(int) - np.array(RED)).max() <= 8


# --- pixel modes -----------------------------------------------------------------------------


def test_greyscale_l_is_repeated_into_three_channels() -> None:
    decoded = decode_image(encode(Image.new("L", (4, 3), 77), "PNG"))
    assert decoded.original_mode == "L"
    assert (pixels(decoded) == 77).all()


def test_bilevel_1_becomes_black_and_white() -> None:
    im = Image.new("1", (4, 1), 0)
    im.putpixel((1, 0), 1)
    decoded = decode_image(encode(im, "PNG"))
    assert decoded.original_mode == "1"
    assert pixels(decoded)[0, :, 0].tolist() == [0, 255, 0, 0]


def test_la_is_composited_over_white() -> None:
    arr = np.array([[[100, 0], [100, 255], [100, 128]]], dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(arr, "LA"), "PNG"))
    assert decoded.original_mode == "LA"
    row = pixels(decoded)[0, :, 0].astype(int)
    assert row[0] == 255  # fully transparent -> background
    assert row[1] == 100  # opaque -> itself
    expected_half = 100 * 128 / 255 + 255 * 127 / 255
    assert abs(row[2] - expected_half) <= 1


def test_rgba_fully_transparent_pixel_becomes_white_and_opaque_stays() -> None:
    arr = np.array([[[255, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert decoded.original_mode == "RGBA"
    assert pixels(decoded)[0].tolist() == [list(WHITE), [10, 20, 30]]


def palette_image() -> Image.Image:
    im = Image.new("P", (3, 1))
    im.putpalette([*RED, *GREEN, *BLUE])
    for x in range(3):
        im.putpixel((x, 0), x)
    return im


def test_palette_image_is_expanded_through_its_palette() -> None:
    decoded = decode_image(encode(palette_image(), "PNG"))
    assert decoded.original_mode == "P"
    assert pixels(decoded)[0].tolist() == [list(RED), list(GREEN), list(BLUE)]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparent_index_becomes_white(fmt: str) -> None:
    decoded = decode_image(encode(palette_image(), fmt, transparency=1))
    assert decoded.original_mode == "P"
    assert pixels(decoded)[0].tolist() == [list(RED), list(WHITE), list(BLUE)]


def test_cmyk_is_converted_to_rgb() -> None:
    im = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow
    decoded = decode_image(encode(im, "TIFF"))
    assert decoded.original_mode == "CMYK"
    assert (pixels(decoded) == RED).all()


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    decoded = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert decoded.original_mode == "CMYK"
    assert np.abs(pixels(decoded).astype(int) - np.array(RED)).max() <= 8


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_to_eight_bit_not_clipped(fmt: str) -> None:
    values = np.array([[0, 32768, 65535, 257, 128, 385, 1000]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), fmt))
    assert decoded.original_mode == "I;16"
    # value * 255 / 65535, rounded: 32768 -> 127.5019 -> 128 (Pillow's convert gives 255).
    assert pixels(decoded)[0, :, 0].tolist() == [0, 128, 255, 1, 0, 1, 4]
    assert (pixels(decoded)[..., 0] == pixels(decoded)[..., 2]).all()


def test_float_tiff_is_min_max_scaled() -> None:
    values = np.array([[2.0, 4.0, 6.0, 5.0]], dtype=np.float32)
    decoded = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert decoded.original_mode == "F"
    assert pixels(decoded)[0, :, 0].tolist() == [0, 128, 255, 191]


def test_constant_float_image_becomes_black() -> None:
    decoded = decode_image(encode(Image.fromarray(np.full((3, 3), 7.5, np.float32)), "TIFF"))
    assert (pixels(decoded) == 0).all()


def test_float_nan_becomes_black_and_does_not_poison_the_scale() -> None:
    values = np.array([[0.0, np.nan, 1.0]], dtype=np.float32)
    decoded = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert pixels(decoded)[0, :, 0].tolist() == [0, 0, 255]


# --- EXIF orientation ------------------------------------------------------------------------


def left_red_right_blue(width: int = 40, height: int = 30) -> Image.Image:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = RED
    arr[:, width // 2 :] = BLUE
    return Image.fromarray(arr)


@pytest.mark.parametrize(("fmt", "tolerance"), [("PNG", 0), ("JPEG", 40)])
def test_exif_orientation_6_is_applied_swapping_width_and_height(fmt: str, tolerance: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    decoded = decode_image(encode(left_red_right_blue(), fmt, exif=exif.tobytes()))
    assert (decoded.width, decoded.height) == (30, 40)
    assert decoded.image.size == (30, 40)
    arr = pixels(decoded).astype(int)
    # Turned clockwise, the left (red) half ends up on top and the blue half at the bottom.
    assert np.abs(arr[5, 15] - np.array(RED)).max() <= tolerance
    assert np.abs(arr[35, 15] - np.array(BLUE)).max() <= tolerance


# --- reduced decoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "needed", "decoded_size"),
    [
        ("JPEG", 0.2, (300, 400)),  # DCT scaling 1/4 of 1200x1600: 300x400 >= 240x320
        ("JPEG", 0.3, (600, 800)),  # 1/4 would be too small: 1/2
        ("PNG", 0.2, (240, 320)),  # whole-factor reduction by 5
        ("JPEG", 1.0, (1200, 1600)),  # every pixel asked for
    ],
)
def test_reduced_decoding_keeps_the_uploads_size_orientation_and_enough_pixels(
    fmt: str, needed: float, decoded_size: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1600x1200, shown 1200x1600
    data = encode(left_red_right_blue(1600, 1200), fmt, exif=exif.tobytes())
    sizes: list[tuple[int, int]] = []

    def scale(width: int, height: int) -> float:
        sizes.append((width, height))
        return needed

    decoded = decode_image(data, scale=scale)
    assert sizes == [(1200, 1600)], "the need is asked for the upright size"
    assert (decoded.width, decoded.height) == (1200, 1600)
    assert decoded.image.size == decoded_size
    arr = pixels(decoded).astype(int)
    top, bottom = arr[decoded_size[1] // 8, decoded_size[0] // 2], arr[-decoded_size[1] // 8, 0]
    assert np.abs(top - np.array(RED)).max() <= 40, "still turned upright"
    assert np.abs(bottom - np.array(BLUE)).max() <= 40


def test_image_without_exif_keeps_its_orientation() -> None:
    decoded = decode_image(encode(left_red_right_blue(), "PNG"))
    assert (decoded.width, decoded.height) == (40, 30)
    assert tuple(pixels(decoded)[0, 0]) == RED


# --- invalid data ----------------------------------------------------------------------------


def test_empty_bytes_are_an_invalid_image() -> None:
    with pytest.raises(InvalidImageError) as info:
        decode_image(b"")
    assert info.value.code == "invalid_image"


@pytest.mark.parametrize(
    "data",
    [b"this is certainly not an image", b"\x00" * 256, b"x", b"<html><body>hi</body></html>"],
)
def test_undecodable_bytes_are_an_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImageError) as info:
        decode_image(data)
    assert info.value.code == "invalid_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP"])
def test_truncated_image_is_invalid(fmt: str) -> None:
    data = encode(noise_image(), fmt)
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP"])
def test_file_cut_inside_its_header_is_invalid_not_unsupported(fmt: str) -> None:
    data = encode(noise_image(), fmt)
    with pytest.raises(InvalidImageError):
        decode_image(data[:24])


def test_truncation_is_not_tolerated_globally() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = encode(noise_image(), "JPEG")
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_error_messages_do_not_leak_internals() -> None:
    data = encode(noise_image(), "PNG")
    for payload in (b"", b"garbage bytes", data[: len(data) // 2], data[:20]):
        with pytest.raises(InvalidImageError) as info:
            decode_image(payload)
        detail = info.value.detail
        assert "BytesIO" not in detail
        assert "0x" not in detail
        assert "/" not in detail
        assert detail.endswith(".")


# --- unsupported formats ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "SGI"])
def test_recognised_but_unaccepted_format_is_unsupported(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    with pytest.raises(UnsupportedImageFormatError) as info:
        decode_image(data)
    error = info.value
    assert error.code == "unsupported_image_format"
    assert error.allowed == list(UPLOAD_FORMATS)
    assert fmt in error.detail
    assert "PNG" in error.detail  # says what to send instead


# --- size limits -----------------------------------------------------------------------------


def forbid_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode pixel data fail the test."""

    def refuse(self: ImageFile.ImageFile) -> None:
        msg = "pixel data must not be decoded for an over-limit image"
        raise AssertionError(msg)

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_decompression_bomb_header_is_refused_before_decoding_pixels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = png_with_header(100_000, 100_000)  # 10**10 pixels declared in 150 bytes
    assert len(data) < 200
    forbid_pixel_decoding(monkeypatch)
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data)
    assert info.value.code == "image_too_large"
    assert "100000x100000" in info.value.detail


def test_size_in_pillows_warning_band_is_refused_without_any_warning() -> None:
    # 10**8 pixels: above Image.MAX_IMAGE_PIXELS, where Image.open would only warn.
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLargeError):
            decode_image(png_with_header(10_000, 10_000))
    assert [str(w.message) for w in caught] == []


def test_pillows_own_pixel_cap_still_applies_when_limits_are_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forbid_pixel_decoding(monkeypatch)
    generous = ImageLimits(max_pixels=10**12, max_side=10**6)
    with pytest.raises(ImageTooLargeError):
        decode_image(png_with_header(100_000, 100_000), generous)


def test_real_highly_compressible_png_over_the_default_limit_is_refused() -> None:
    data = encode(Image.new("1", (7_000, 7_000)), "PNG")  # 49 megapixels, a few kB
    assert len(data) < 100_000
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_max_pixels_limit_is_inclusive() -> None:
    limits = ImageLimits(max_pixels=100)
    assert decode_image(encode(Image.new("RGB", (10, 10)), "PNG"), limits).width == 10
    with pytest.raises(ImageTooLargeError):
        decode_image(encode(Image.new("RGB", (11, 10)), "PNG"), limits)


@pytest.mark.parametrize("size", [(33, 1), (1, 33)])
def test_max_side_limit_applies_to_width_and_height(size: tuple[int, int]) -> None:
    limits = ImageLimits(max_side=32)
    assert decode_image(encode(Image.new("RGB", (32, 32)), "PNG"), limits).height == 32
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(encode(Image.new("RGB", size), "PNG"), limits)
    assert "32" in info.value.detail


def test_default_limits() -> None:
    assert ImageLimits() == ImageLimits(max_pixels=40_000_000, max_side=16_384)


@pytest.mark.parametrize("kwargs", [{"max_pixels": 0}, {"max_side": -1}])
def test_non_positive_limits_are_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(**kwargs)


# --- concurrency and layering ----------------------------------------------------------------


def test_concurrent_decoding_gives_the_same_results_as_sequential() -> None:
    payloads = [
        encode(noise_image(seed=i), fmt)
        for i, fmt in enumerate(["PNG", "BMP", "TIFF", "GIF", "JPEG", "WEBP"] * 4)
    ]
    expected = [pixels(decode_image(p)) for p in payloads]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda p: pixels(decode_image(p)), payloads * 3))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, expected[i % len(payloads)])


def test_decoded_image_is_detached_from_the_upload() -> None:
    decoded = decode_image(encode(noise_image(), "GIF"))
    assert not isinstance(decoded.image, ImageFile.ImageFile)
    assert decoded.image.mode == "RGB"


def test_engine_image_modules_do_not_import_fastapi() -> None:
    code = (
        "import sys, service.engine.imaging.images, service.engine.pictures.overlays; "
        "sys.exit(1 if any(m.split('.')[0] in ('fastapi', 'starlette') for m in sys.modules)"
        " else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
