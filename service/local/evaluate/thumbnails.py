"""The thumbnails of ``gradcam-service evaluate``: small overlays of the first images' maps,
written under the output folder and shown in the HTML report."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.engine.pictures.overlays import encode_png, overlay
from service.local.files import LocalImage, safe_name

THUMBNAILS_DIR = "thumbnails"
THUMBNAIL_SIDE = 128


def thumbnail_name(layer: str, method: str, index: int) -> str:
    """The file of the ``index``-th image's map by (``layer``, ``method``)."""
    return f"{safe_name(layer)}__{safe_name(method)}__{index:05d}.png"


def thumbnail(image: LocalImage, heat: np.ndarray) -> bytes:
    """The overlay, at most THUMBNAIL_SIDE pixels on a side, as PNG."""
    picture = overlay(np.asarray(image.decoded.image), heat)
    small = Image.fromarray(picture)
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return encode_png(np.asarray(small))
