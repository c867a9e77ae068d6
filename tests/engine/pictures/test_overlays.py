"""Tests for ``service.engine.pictures.overlays``: colour maps, overlays, the panel and encoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.engine.pictures._colormaps import LUTS
from service.engine.pictures.overlays import (
    COLORMAPS,
    HATCH_PERIOD,
    HATCH_WIDTH,
    MEDIA_TYPES,
    OVERLAY_FORMATS,
    colorize,
    encode_image,
    not_seen,
    not_seen_colour,
    overlay,
    panel_size_bound,
    render_panel,
)
from service.errors import InvalidParameterError


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def ramp(height: int, width: int) -> np.ndarray:
    """A heatmap going from 0 at the left to 1 at the right."""
    return np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))


# --- lookup tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", COLORMAPS)
def test_lookup_table_equals_matplotlibs_colormap(name: str) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    expected = np.rint(matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255)
    assert colorize(np.linspace(0.0, 1.0, 256)[None, :], name)[0].tolist() == expected.tolist()


def test_every_offered_colormap_has_a_read_only_table() -> None:
    assert set(COLORMAPS) == set(LUTS)
    assert COLORMAPS[0] == "jet"
    for table in LUTS.values():
        assert table.shape == (256, 3)
        assert table.dtype == np.uint8
        assert not table.flags.writeable


def test_jet_is_blue_at_zero_and_dark_red_at_one_not_black() -> None:
    low, high = colorize(np.array([[0.0, 1.0]]))[0].tolist()
    assert low == [0, 0, 128]
    assert high == [128, 0, 0]  # the seed's LUT wrapped 1.0 to index 0 (black)


def test_jet_keeps_the_threshold_floor_blue_not_black() -> None:
    r, _g, b = colorize(np.array([[0.125]]))[0, 0].tolist()
    assert b == 255
    assert r == 0


def test_colorize_rounds_to_the_nearest_table_entry() -> None:
    values = np.arange(256, dtype=np.float64)[None, :] / 255.0
    np.testing.assert_array_equal(colorize(values, "viridis")[0], LUTS["viridis"])
    just_below_half_step = np.array([[0.4 / 255, 0.6 / 255]])
    assert colorize(just_below_half_step, "gray")[0, :, 0].tolist() == [0, 1]


def test_colorize_clips_out_of_range_values_and_maps_nan_to_zero() -> None:
    out = colorize(np.array([[-3.0, 0.0, 1.0, 7.0, np.nan, np.inf, -np.inf]], np.float32))
    row = out[0].tolist()
    assert row[0] == row[1] == row[4] == row[6]
    assert row[2] == row[3] == row[5]


def test_colorize_returns_uint8_rgb_of_the_heatmaps_size() -> None:
    out = colorize(ramp(5, 7), "turbo")
    assert out.dtype == np.uint8
    assert out.shape == (5, 7, 3)


def test_colorize_does_not_modify_its_input() -> None:
    heat = np.array([[np.nan, 2.0, 0.5]], dtype=np.float32)
    colorize(heat)
    assert np.isnan(heat[0, 0])
    assert heat[0, 1:].tolist() == [2.0, 0.5]


@pytest.mark.parametrize(
    "bad", [np.zeros(5), np.zeros((2, 2, 2)), np.zeros((3, 3), dtype=np.uint8)]
)
def test_colorize_rejects_non_2d_or_non_float_heatmaps(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D float"):
        colorize(bad)


@pytest.mark.parametrize("name", ["hot", "Jet", "", "viridis_r"])
def test_unknown_colormap_is_an_invalid_parameter_listing_allowed_values(name: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        colorize(ramp(2, 2), name)
    assert info.value.code == "invalid_parameter"
    assert info.value.allowed == list(COLORMAPS)


# --- overlay ---------------------------------------------------------------------------------


def test_overlay_with_alpha_zero_is_the_image() -> None:
    image = noise(6, 9)
    np.testing.assert_array_equal(overlay(image, ramp(6, 9), alpha=0.0), image)


@pytest.mark.parametrize("name", COLORMAPS)
def test_overlay_with_alpha_one_is_the_coloured_heatmap(name: str) -> None:
    heat = ramp(6, 9)
    np.testing.assert_array_equal(overlay(noise(6, 9), heat, name, 1.0), colorize(heat, name))


def test_overlay_never_wraps_a_white_image_under_red_heat() -> None:
    white = np.full((4, 4, 3), 255, dtype=np.uint8)
    out = overlay(white, np.ones((4, 4), np.float32), "jet", 0.5)
    # 0.5 * (255, 255, 255) + 0.5 * (128, 0, 0), rounded; a uint8 sum would wrap to ~(127, ...).
    assert out[0, 0].tolist() == [192, 128, 128]
    assert out.min() >= 128


@pytest.mark.parametrize("alpha", [0.1, 0.35, 0.5, 0.9])
def test_overlay_matches_a_float_blend(alpha: float) -> None:
    image, heat = noise(16, 16, seed=3), np.random.default_rng(4).random((16, 16))
    expected = np.rint((1 - alpha) * image + alpha * colorize(heat).astype(float))
    diff = np.abs(overlay(image, heat, alpha=alpha).astype(float) - expected)
    assert diff.max() <= 1


def test_overlay_returns_uint8_rgb_of_the_images_size() -> None:
    out = overlay(noise(5, 8), ramp(5, 8))
    assert out.dtype == np.uint8
    assert out.shape == (5, 8, 3)


def test_overlay_accepts_pil_images_and_greyscale_arrays() -> None:
    rgb = noise(5, 8)
    heat = ramp(5, 8)
    np.testing.assert_array_equal(overlay(Image.fromarray(rgb), heat), overlay(rgb, heat))
    grey = rgb[..., 0]
    np.testing.assert_array_equal(
        overlay(grey, heat), overlay(np.repeat(grey[..., None], 3, axis=2), heat)
    )
    np.testing.assert_array_equal(
        overlay(Image.fromarray(grey), heat), overlay(np.stack([grey] * 3, axis=2), heat)
    )


def test_overlay_rejects_a_heatmap_of_another_size() -> None:
    with pytest.raises(ValueError, match="does not match"):
        overlay(noise(5, 8), ramp(8, 5))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_overlay_rejects_alpha_outside_zero_to_one(alpha: float) -> None:
    with pytest.raises(InvalidParameterError):
        overlay(noise(2, 2), ramp(2, 2), alpha=alpha)


def test_overlay_rejects_non_uint8_image_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        overlay(noise(2, 2).astype(np.float32), ramp(2, 2))


# --- panel -----------------------------------------------------------------------------------


def find(haystack: np.ndarray, needle: np.ndarray) -> tuple[int, int] | None:
    """Top-left corner where ``needle`` appears exactly inside ``haystack``, if anywhere."""
    height, width = needle.shape[:2]
    for y, x in np.argwhere((haystack == needle[0, 0]).all(axis=2)):
        if (haystack[y : y + height, x : x + width] == needle).all():
            return int(y), int(x)
    return None


def test_panel_contains_the_original_pixels_and_is_wider_than_three_images() -> None:
    image = noise(300, 280)  # already a display size: shown unscaled
    panel = render_panel(image, ramp(300, 280))
    assert panel.dtype == np.uint8
    assert panel.ndim == 3
    assert panel.shape[2] == 3
    assert panel.shape[1] > 3 * 280
    assert panel.shape[0] >= 300
    assert find(panel, image) is not None


def test_panel_contains_the_overlay_and_the_heatmap() -> None:
    image, heat = noise(300, 280), ramp(300, 280)
    panel = render_panel(image, heat, "viridis", 0.4)
    assert find(panel, overlay(image, heat, "viridis", 0.4)) is not None
    assert find(panel, colorize(heat, "viridis")) is not None


def test_panel_background_is_white_and_scale_shows_both_ends() -> None:
    panel = render_panel(noise(300, 280), ramp(300, 280), "jet")
    assert panel[0, 0].tolist() == [255, 255, 255]
    assert panel[-1, -1].tolist() == [255, 255, 255]
    scale_region = panel[:, 3 * 280 :]
    assert (scale_region == [128, 0, 0]).all(axis=2).any()  # jet at 1.0
    assert (scale_region == [0, 0, 128]).all(axis=2).any()  # jet at 0.0


@pytest.mark.parametrize(("height", "width"), [(7, 7), (14, 20), (2000, 3000), (5000, 400)])
def test_panel_is_shown_at_a_display_size_whatever_the_input_size(height: int, width: int) -> None:
    panel = render_panel(noise(height, width), ramp(height, width))
    assert 256 <= panel.shape[0] <= 700
    assert panel.shape[1] <= 4 * 1024 + 400


def test_title_adds_a_line_on_top_without_widening_the_panel() -> None:
    image, heat = noise(300, 280), ramp(300, 280)
    plain = render_panel(image, heat)
    titled = render_panel(image, heat, title="Grad-CAM for 'tabby cat' (p=0.93)")
    assert titled.shape[1] == plain.shape[1]
    assert titled.shape[0] > plain.shape[0]
    top_strip = titled[: titled.shape[0] - plain.shape[0] + 10]
    assert (top_strip < 128).any()  # some dark text was drawn


def test_long_or_multiline_title_is_fitted_to_the_panel_width() -> None:
    image, heat = noise(300, 280), ramp(300, 280)
    plain = render_panel(image, heat)
    titled = render_panel(image, heat, title="very long title\nwith lines " * 80)
    assert titled.shape[1] == plain.shape[1]


def test_panel_rejects_a_heatmap_of_another_size() -> None:
    with pytest.raises(ValueError, match="does not match"):
        render_panel(noise(30, 40), ramp(40, 30))


def test_panel_rejects_an_unknown_colormap() -> None:
    with pytest.raises(InvalidParameterError) as info:
        render_panel(noise(30, 40), ramp(30, 40), "rainbow")
    assert info.value.allowed == list(COLORMAPS)


# --- what the model did not see ----------------------------------------------------------


def test_pixels_outside_the_seen_box_are_grey_and_hatched_not_painted_as_low_values() -> None:
    """A 40x20 picture whose centre 20x20 the model saw: its map is 0 outside (the crop), and
    the overlay there is the picture's grey with stripes, not the colour table's blue."""
    pixels = noise(20, 40, seed=3)
    heat = np.zeros((20, 40), dtype=np.float32)
    drawn = overlay(pixels, heat, "jet", alpha=1.0, seen=(10.0, 0.0, 30.0, 20.0))

    inside, outside = drawn[:, 10:30], np.concatenate([drawn[:, :10], drawn[:, 30:]], axis=1)
    assert (inside == LUTS["jet"][0]).all(), "the seen part is the map's colour"
    assert (outside[..., 0] == outside[..., 1]).all()
    assert (outside[..., 1] == outside[..., 2]).all()
    rgb = pixels.astype(np.int32)
    grey = (77 * rgb[..., 0] + 150 * rgb[..., 1] + 29 * rgb[..., 2] + 128) >> 8
    y, x = 0, 1  # (0 + 1) % 8 < 2: on a stripe
    assert drawn[y, x, 0] == (grey[y, x] + 160) >> 1
    y, x = 0, 5  # off the stripes: the grey itself
    assert drawn[y, x, 0] == grey[y, x]


def test_the_hatching_is_diagonal_stripes_of_the_stated_period() -> None:
    flat = not_seen_colour(np.full((16, 16, 3), 100, dtype=np.uint8))[..., 0]
    ys, xs = np.mgrid[0:16, 0:16]
    stripes = (xs + ys) % HATCH_PERIOD < HATCH_WIDTH
    assert (flat[stripes] == (100 + 160) >> 1).all()
    assert (flat[~stripes] == 100).all()


def test_the_not_seen_border_is_blended_like_the_heatmap_so_alpha_zero_is_the_image() -> None:
    pixels = noise(12, 30, seed=4)
    heat = ramp(12, 30)
    box = (6.0, 0.0, 24.0, 12.0)
    assert np.array_equal(overlay(pixels, heat, alpha=0.0, seen=box), pixels)
    half = overlay(pixels, heat, alpha=0.5, seen=box).astype(np.int32)
    grey = not_seen_colour(pixels).astype(np.int32)
    expected = (pixels.astype(np.int32) * 128 + grey * 128 + 128) >> 8
    assert np.array_equal(half[:, :6], expected[:, :6])


def test_a_box_covering_the_picture_or_none_changes_nothing() -> None:
    pixels = noise(10, 10, seed=5)
    heat = ramp(10, 10)
    plain = overlay(pixels, heat)
    assert np.array_equal(overlay(pixels, heat, seen=(0.0, 0.0, 10.0, 10.0)), plain)
    assert np.array_equal(overlay(pixels, heat, seen=(-3.0, -1.0, 12.0, 11.0)), plain)
    assert not_seen((0.0, 0.0, 10.0, 10.0), 10, 10) is None
    assert not_seen(None, 10, 10) is None


def test_a_pixel_is_seen_when_its_centre_lies_in_the_box() -> None:
    mask = not_seen((2.5, 0.0, 7.5, 1.0), 10, 1)
    assert mask is not None
    assert mask[0].tolist() == [True, True, False, False, False, False, False, True, True, True]


def test_a_panel_with_a_not_seen_border_hatches_it_and_says_so_under_the_parts() -> None:
    pixels = np.full((64, 128, 3), 200, dtype=np.uint8)
    heat = np.zeros((64, 128), dtype=np.float32)
    box = (32.0, 0.0, 96.0, 64.0)
    plain = render_panel(pixels, heat)
    marked = render_panel(pixels, heat, seen=box)
    assert marked.shape[0] > plain.shape[0], "no legend line"
    assert marked.shape[1] == plain.shape[1]
    stripe = (200 + 160) >> 1
    top_rows = marked[: plain.shape[0] - 20]
    assert (top_rows == stripe).all(axis=2).sum() > 1000, "no hatching in the parts"
    assert not (plain == stripe).all(axis=2).any()


def test_a_thin_tall_panel_with_its_legend_fits_the_size_bound() -> None:
    pixels = np.full((600, 30, 3), 90, dtype=np.uint8)
    heat = np.zeros((600, 30), dtype=np.float32)
    panel = render_panel(pixels, heat, seen=(0.0, 100.0, 30.0, 500.0))
    bound_w, bound_h = panel_size_bound(30, 600)
    assert panel.shape[1] <= bound_w
    assert panel.shape[0] <= bound_h


# --- encoding --------------------------------------------------------------------------------

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


@pytest.mark.parametrize("fmt", OVERLAY_FORMATS)
def test_encoded_image_has_the_right_magic_bytes_and_round_trips(fmt: str) -> None:
    array = np.zeros((32, 48, 3), dtype=np.uint8)
    array[:, :24] = (200, 30, 30)
    array[:, 24:] = (20, 40, 220)
    data = encode_image(array, fmt)
    if fmt == "webp":
        assert data[:4] == b"RIFF"
        assert data[8:12] == b"WEBP"
    else:
        assert data.startswith(MAGIC[fmt])
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert decoded.shape == array.shape
    if fmt == "png":
        np.testing.assert_array_equal(decoded, array)
    else:
        assert np.abs(decoded - array).mean() < 4


def test_encode_accepts_greyscale_arrays() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    decoded = Image.open(io.BytesIO(encode_image(grey, "png")))
    np.testing.assert_array_equal(np.asarray(decoded), grey)


def test_jpeg_quality_changes_the_size() -> None:
    array = noise(64, 64)
    assert len(encode_image(array, "jpeg", quality=20)) < len(encode_image(array, "jpeg", 95))


def test_media_types_cover_every_format() -> None:
    assert MEDIA_TYPES == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
    assert set(OVERLAY_FORMATS) == set(MEDIA_TYPES)


@pytest.mark.parametrize("fmt", ["gif", "bmp", "jpg ", ""])
def test_unknown_format_is_an_invalid_parameter_listing_allowed_values(fmt: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        encode_image(noise(4, 4), fmt)
    assert info.value.code == "invalid_parameter"
    assert info.value.allowed == list(OVERLAY_FORMATS)


@pytest.mark.parametrize("quality", [0, 101, -5])
def test_quality_outside_one_to_hundred_is_an_invalid_parameter(quality: int) -> None:
    with pytest.raises(InvalidParameterError):
        encode_image(noise(4, 4), "jpeg", quality)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4, 4), dtype=np.uint8),
        np.zeros((0, 4, 3), dtype=np.uint8),
    ],
)
def test_encode_rejects_arrays_that_are_not_uint8_rgb(array: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_image(array)


@pytest.mark.parametrize(
    ("height", "width"),
    # The last two are past the size compressed in parallel pieces, one not dividing evenly.
    [(1, 1), (2, 3), (31, 17), (240, 320), (513, 701), (756, 1008)],
)
@pytest.mark.parametrize("channels", [3, 1])
def test_png_encoding_round_trips_exactly(height: int, width: int, channels: int) -> None:
    rng = np.random.default_rng(height * width + channels)
    shape = (height, width, 3) if channels == 3 else (height, width)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    data = encode_image(pixels, "png")
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.mode == ("RGB" if channels == 3 else "L")
        np.testing.assert_array_equal(np.asarray(decoded), pixels)
    # zlib checks what a PNG reader may not: the stream's end and its Adler-32.
    rows = zlib.decompress(_png_chunks(data)[b"IDAT"])
    assert len(rows) == height * (width * channels + 1)


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    """The payloads of a PNG's chunks by type, each chunk's CRC checked."""
    chunks: dict[bytes, bytes] = {}
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, payload = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(payload, zlib.crc32(kind))
        chunks[kind] = chunks.get(kind, b"") + payload
        at += 12 + length
    return chunks


def test_png_encoding_compresses_smooth_pictures() -> None:
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    assert len(encode_image(smooth, "png")) < smooth.nbytes / 4


@pytest.mark.parametrize(
    ("width", "height"), [(438, 328), (753, 376), (872, 872), (977, 488), (224, 224), (201, 119)]
)
def test_a_maps_zeros_on_the_image_are_exactly_the_hatched_pixels(width: int, height: int) -> None:
    """map_to_original and the hatching decide what the model saw by one rule (float64 on the
    input's box): sizes where a float32 decision once differed by a column."""
    from service.engine.models.preprocess import Geometry, map_to_original

    short = min(width, height)
    geometry = Geometry(
        original_size=(height, width),
        input_size=(224, 224),
        scale_x=256 / short,
        scale_y=256 / short,
        offset_x=round((256 * width / short - 224) / 2),
        offset_y=round((256 * height / short - 224) / 2),
    )
    ones = map_to_original(np.ones((7, 7), dtype=np.float32), geometry, normalize=False)
    mask = not_seen(geometry.input_box(), width, height)
    assert mask is not None
    assert np.array_equal(ones == 0, mask)
