"""The report's thumbnails: large enough to read, with the labelled boxes, their class, and the
map's peak drawn, so that a pointing-game hit can be checked by eye; what the model did not see
(a wide image's cropped ends) hatched grey rather than coloured as "not looked at"."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.engine.imaging.images import ImageLimits
from service.engine.models.loaded import LoadedModel
from service.local.evaluate.thumbnails import THUMBNAIL_SIDE, crops_away, thumbnail
from service.local.files import LocalImage, read_image

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def _image(tmp_path: Path, model: LoadedModel, size: tuple[int, int]) -> LocalImage:
    path = tmp_path / "grey.png"
    Image.new("RGB", size, (128, 128, 128)).save(path)
    return read_image(path, model, ImageLimits())


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as picture:
        return np.asarray(picture.convert("RGB"))


def _is_grey(pixel: np.ndarray) -> bool:
    return bool(pixel[0] == pixel[1] == pixel[2])


def test_a_thumbnail_draws_the_labelled_box_its_class_and_the_peak_at_the_thumbnails_scale(
    tmp_path: Path, shapes_model: LoadedModel
) -> None:
    image = _image(tmp_path, shapes_model, (128, 64))  # the centre crop cuts 32 px each side
    heat = np.zeros((64, 128), dtype=np.float32)
    heat[30, 60] = 1.0  # the peak, inside the box
    pixels = _pixels(thumbnail(image, heat, boxes=[(40, 10, 80, 50)], label="disk"))
    assert pixels.shape == (THUMBNAIL_SIDE // 2, THUMBNAIL_SIDE, 3)  # scaled 2x, readable
    scale = THUMBNAIL_SIDE / 128
    left, top, bottom = round(40 * scale), round(10 * scale), round(50 * scale)
    middle = (top + bottom) // 2
    assert tuple(pixels[middle, left]) == WHITE  # the box's left edge, on its dark rim
    assert tuple(pixels[middle, left + 1]) == BLACK
    assert tuple(pixels[top - 1, left]) == BLACK  # the class's label sits on the box, dark
    peak_x, peak_y = round(60.5 * scale), round(30.5 * scale)
    assert tuple(pixels[peak_y, peak_x]) == WHITE  # the circled cross's centre
    assert tuple(pixels[peak_y, peak_x - 20]) != WHITE  # a mark, not a blob
    # Outside the model's input (x < 32 or x >= 96 on the image): grey and hatched; inside,
    # the map's colour (jet's dark blue for 0), not grey.
    assert crops_away(image)
    for x in (0, round(20 * scale), THUMBNAIL_SIDE - 1):
        column = pixels[:, x]
        assert all(_is_grey(p) for p in column)
        assert len({int(p[0]) for p in column}) == 2  # the image's grey and the stripes'
    assert not _is_grey(pixels[bottom + 10, round(64 * scale)])


@pytest.mark.parametrize("size", [(64, 64), (32, 48)], ids=["square", "small-tall"])
def test_a_thumbnail_is_scaled_to_its_long_side_and_a_square_image_has_no_hatching(
    size: tuple[int, int], tmp_path: Path, shapes_model: LoadedModel
) -> None:
    image = _image(tmp_path, shapes_model, size)
    heat = np.zeros((size[1], size[0]), dtype=np.float32)
    pixels = _pixels(thumbnail(image, heat))
    assert max(pixels.shape[:2]) == THUMBNAIL_SIDE
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx(size[0] / size[1], abs=0.01)
    if size[0] == size[1]:
        assert not crops_away(image)
        assert not any(_is_grey(p) for p in pixels.reshape(-1, 3))  # coloured everywhere


def test_an_object_given_as_a_mask_is_outlined(tmp_path: Path, shapes_model: LoadedModel) -> None:
    image = _image(tmp_path, shapes_model, (64, 64))
    heat = np.zeros((64, 64), dtype=np.float32)
    outline = np.zeros((64, 64), dtype=bool)
    outline[16:48, 16:48] = True
    pixels = _pixels(thumbnail(image, heat, outline=outline))
    scale = THUMBNAIL_SIDE // 64
    assert tuple(pixels[32 * scale, 16 * scale]) == WHITE  # the edge
    assert tuple(pixels[32 * scale, 32 * scale]) != WHITE  # not the inside
