"""The thumbnails of ``gradcam-service evaluate``: the first images' maps, written under the
output folder and shown in the HTML report, marked so that a pointing-game hit can be checked
by eye: the labelled boxes (with their class) and a mask's outline, the map's peak (the point
the pointing game checks), and, hatched, what the model did not see (cropped away)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from service.engine.pictures.overlays import encode_png, overlay, partly_seen
from service.local.evaluate.localisation import peak
from service.local.files import LocalImage, safe_name

THUMBNAILS_DIR = "thumbnails"
#: Pixels on a thumbnail's long side: the image is scaled up or down to it, so that the boxes,
#: their labels and the peak can be read.
THUMBNAIL_SIDE = 256
_FONT_SIZE = 12
_LIGHT = (255, 255, 255)
_DARK = (0, 0, 0)
_PEAK_RADIUS = 6

Box = tuple[float, float, float, float]


def thumbnail_name(layer: str, method: str, index: int) -> str:
    """The file of the ``index``-th image's map by (``layer``, ``method``)."""
    return f"{safe_name(layer)}__{safe_name(method)}__{index:05d}.png"


def thumbnail_size(width: int, height: int) -> tuple[int, int]:
    """A thumbnail's (width, height): the image's shape, THUMBNAIL_SIDE on its long side."""
    scale = THUMBNAIL_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def crops_away(image: LocalImage) -> bool:
    """Whether part of ``image`` never reached the model (the centre crop's cut ends): its
    thumbnails show that part hatched, and the report's legend says what hatching means."""
    width, height = image.decoded.width, image.decoded.height
    return partly_seen(image.geometry.input_box(), width, height)


def thumbnail(
    image: LocalImage,
    heat: np.ndarray,
    boxes: Sequence[Box] = (),
    label: str | None = None,
    outline: np.ndarray | None = None,
) -> bytes:
    """The overlay of ``heat`` (the map on the image's pixels) at :func:`thumbnail_size`, as
    PNG: outside the model's input box hatched (not seen), the labelled ``boxes`` (the image's
    pixel coordinates) drawn with ``label`` over the first, the edge of ``outline`` (a mask's
    object pixels, the image's height and width) traced, and the map's peak circled."""
    width, height = image.decoded.width, image.decoded.height
    size = thumbnail_size(width, height)
    shown = image.decoded.image.resize(size, Image.Resampling.LANCZOS)
    small_heat = np.asarray(
        Image.fromarray(np.asarray(heat, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    )
    seen = image.geometry.resized(*size).input_box()
    canvas = Image.fromarray(overlay(shown, np.clip(small_heat, 0.0, 1.0), seen=seen))
    sx, sy = size[0] / width, size[1] / height
    if outline is not None:
        _trace(canvas, outline)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=_FONT_SIZE)
    for number, (left, top, right, bottom) in enumerate(boxes):
        x0, x1 = sorted((left * sx, right * sx))
        y0, y1 = sorted((top * sy, bottom * sy))
        draw.rectangle((x0, y0, x1, y1), outline=_DARK, width=3)
        draw.rectangle((x0, y0, x1, y1), outline=_LIGHT, width=1)
        if label is not None and number == 0:
            _label(draw, label, (x0, y0), size, font)
    top_pixel = peak(heat)
    if top_pixel is not None:
        row, col = top_pixel
        _mark_peak(draw, ((col + 0.5) * sx, (row + 0.5) * sy))
    return encode_png(np.asarray(canvas))


def _trace(canvas: Image.Image, outline: np.ndarray) -> None:
    """Paint the edge of the ``outline`` mask, scaled to ``canvas``, in the light colour."""
    mask = Image.fromarray(np.asarray(outline, dtype=np.uint8) * 255).resize(
        canvas.size, Image.Resampling.NEAREST
    )
    inner = mask.filter(ImageFilter.MinFilter(3))
    edge = np.asarray(mask) > np.asarray(inner)
    pixels = np.array(canvas)
    pixels[edge] = _LIGHT
    canvas.paste(Image.fromarray(pixels))


def _label(
    draw: ImageDraw.ImageDraw,
    text: str,
    corner: tuple[float, float],
    size: tuple[int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """``text`` light on dark, just above the box's top-left ``corner`` (inside the box where
    there is no room above), kept on the picture."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left + 4, bottom - top + 4
    x = min(max(0.0, corner[0]), max(0.0, size[0] - text_w))
    y = corner[1] - text_h if corner[1] >= text_h else min(corner[1] + 2, size[1] - text_h)
    draw.rectangle((x, y, x + text_w - 1, y + text_h - 1), fill=_DARK)
    draw.text((x + 2 - left, y + 2 - top), text, fill=_LIGHT, font=font)


def _mark_peak(draw: ImageDraw.ImageDraw, centre: tuple[float, float]) -> None:
    """A circled cross at ``centre``, light edged with dark, seen on any colour."""
    x, y = centre
    r = _PEAK_RADIUS
    for colour, width in ((_DARK, 4), (_LIGHT, 2)):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
        draw.line((x - r - 3, y, x + r + 3, y), fill=colour, width=width - 1)
        draw.line((x, y - r - 3, x, y + r + 3), fill=colour, width=width - 1)
