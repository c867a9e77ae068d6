"""The labels file of ``gradcam-service evaluate``: each image's class, and where its object is
(boxes, or a mask image), and that object's pixels on the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.local.files import CommandError, LocalImage
from service.settings import validation_summary

Box = tuple[float, float, float, float]


class Annotation(BaseModel):
    """What the labels file says about one image: its class, and where the object is."""

    model_config = ConfigDict(extra="forbid")

    label: int | str | None = Field(
        default=None, description="The class to explain, by index or label; else the predicted."
    )
    boxes: list[Box] = Field(
        default_factory=list,
        description="Boxes around the object, (left, top, right, bottom) in the image's pixels.",
    )
    mask: str | None = Field(
        default=None,
        description="An image of the object's pixels (non-zero), the image's size; relative to"
        " the labels file.",
    )


def load_annotations(path: Path) -> dict[str, Annotation]:
    """``{"<file, relative to the folder>": {"label": ..., "boxes": [[l, t, r, b]], "mask":
    "..."}}``; mask paths are made relative to the labels file's folder."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(f"{path}: cannot read it as JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise CommandError(f'{path}: expected an object {{"image.png": {{"label": ...}}, ...}}.')
    annotations: dict[str, Annotation] = {}
    for name, entry in data.items():
        try:
            annotation = Annotation.model_validate(entry)
        except ValidationError as exc:
            raise CommandError(f"{path}: {name}: {validation_summary(exc)}") from None
        if annotation.mask is not None:
            annotation.mask = str((path.parent / annotation.mask).resolve())
        annotations[Path(name).as_posix()] = annotation
    return annotations


def object_region(annotation: Annotation, image: LocalImage) -> np.ndarray | None:
    """The object's pixels on the image (H, W): those whose centres lie in a box, or in the
    mask; None without boxes or mask."""
    if not annotation.boxes and annotation.mask is None:
        return None
    width, height = image.decoded.width, image.decoded.height
    region = np.zeros((height, width), dtype=bool)
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    for left, top, right, bottom in annotation.boxes:
        region |= ((ys >= top) & (ys <= bottom))[:, None] & ((xs >= left) & (xs <= right))[None]
    if annotation.mask is not None:
        try:
            with Image.open(annotation.mask) as mask:
                pixels = np.asarray(mask.convert("L"))
        except OSError as exc:
            raise CommandError(f"mask {annotation.mask}: cannot read it ({exc}).") from None
        if pixels.shape != region.shape:
            raise CommandError(
                f"mask {annotation.mask} is {pixels.shape[1]}x{pixels.shape[0]} pixels, the"
                f" image {width}x{height}."
            )
        region |= pixels > 0
    return region
