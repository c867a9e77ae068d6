"""Showing a DICOM frame as a radiology viewer does (PS3.3 C.11, PS3.4 N.2): the modality LUT,
the VOI transform (a window, the file's VOI LUT, or a percentile range) and MONOCHROME1
inversion, to 8 bits. Reading the object is :mod:`service.engine.imaging.dicom_reading`, decoding
its frame :mod:`service.engine.imaging.dicom_decoding`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi

from service.errors import InvalidParameterError

WindowSource = Literal["request", "file", "voi_lut", "percentile", "full_range"]
VoiFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID", "LUT"]


@dataclass(frozen=True)
class Window:
    """A VOI window in the units after the modality LUT (e.g. Hounsfield units for CT)."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width) and self.width >= 1):
            raise InvalidParameterError(
                "A window needs a finite centre and a width of at least 1 (DICOM's LINEAR"
                " function)."
            )


@dataclass(frozen=True)
class DisplayOptions:
    """What the caller asks of a DICOM upload: a window instead of the file's, and a frame."""

    window: Window | None = None
    frame: int = 0


@dataclass(frozen=True)
class AppliedWindow:
    """The VOI transform a frame was shown with; a LUT has no centre or width."""

    center: float | None
    width: float | None
    function: VoiFunction
    source: WindowSource


def grey_display(
    ds: Dataset, raw: np.ndarray, options: DisplayOptions
) -> tuple[npt.NDArray[np.uint8], AppliedWindow]:
    """Modality LUT, VOI transform to 0..255, then MONOCHROME1 inversion."""
    values, rescaled = _modality(ds, raw, options.frame)
    function = _voi_function(ds, options.frame)
    if options.window is not None:
        window = AppliedWindow(options.window.center, options.window.width, function, "request")
    elif (file_window := _file_window(ds, options.frame)) is not None:
        window = AppliedWindow(file_window.center, file_window.width, function, "file")
    elif ds.get("VOILUTSequence"):
        lut = apply_voi(np.rint(values).astype(np.int64) if rescaled else raw, ds)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        shown = _scale_to_u8(lut.astype(np.float64), 0.0, float(2**bits - 1))
        return _invert(ds, shown), AppliedWindow(None, None, "LUT", "voi_lut")
    elif not rescaled and int(ds.get("BitsStored", ds.BitsAllocated)) <= 8:
        low, high = _stored_range(ds)
        window = AppliedWindow((low + high) / 2, high - low, "LINEAR_EXACT", "full_range")
    else:
        low, high = (float(v) for v in np.percentile(values, (0.5, 99.5)))
        window = AppliedWindow((low + high) / 2, high - low, "LINEAR_EXACT", "percentile")
    return _invert(ds, apply_window(values, window)), window


def apply_window(values: np.ndarray, window: AppliedWindow) -> npt.NDArray[np.uint8]:
    """The VOI window functions of PS3.3 C.11.2.1.2-3, with an output range of 0..255,
    rounded half up. A LINEAR_EXACT window of width 0 (a constant image) is all 0."""
    if window.center is None or window.width is None:
        raise ValueError("a LUT is not a window")
    x = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700.0, 700.0)))
    elif window.function == "LINEAR_EXACT":
        if w <= 0:
            return np.zeros(x.shape, dtype=np.uint8)
        y = np.where(
            x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, ((x - c) / w + 0.5) * 255.0)
        )
    elif w <= 1:  # LINEAR of width 1: a step at the centre
        y = np.where(x <= c - 0.5, 0.0, 255.0)
    else:
        low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        y = np.where(
            x <= low,
            0.0,
            np.where(x > high, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0),
        )
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def _modality(ds: Dataset, raw: np.ndarray, frame: int) -> tuple[np.ndarray, bool]:
    """Stored values -> modality values (float64), and whether a transform was applied."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(raw, ds).astype(np.float64), True
    slope = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None and intercept is None:
        return raw.astype(np.float64), False
    values = raw.astype(np.float64) * (1.0 if slope is None else float(slope))  # type: ignore[arg-type]
    values += 0.0 if intercept is None else float(intercept)  # type: ignore[arg-type]
    return values, True


def _file_window(ds: Dataset, frame: int) -> Window | None:
    """The object's first window for this frame, if it has a usable one."""
    center = _first(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None:
        return None
    try:
        return Window(float(center), float(width))  # type: ignore[arg-type]
    except (InvalidParameterError, TypeError, ValueError):
        return None  # a malformed window is ignored, as viewers do


def _voi_function(ds: Dataset, frame: int) -> Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]:
    value = _frame_value(ds, frame, "FrameVOILUTSequence", "VOILUTFunction")
    name = str(value or "LINEAR").strip().upper()
    if name == "LINEAR_EXACT":
        return "LINEAR_EXACT"
    if name == "SIGMOID":
        return "SIGMOID"
    return "LINEAR"


def _frame_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> object:
    """An attribute of the frame: its per-frame functional group, else the shared one (enhanced
    multi-frame objects), else the top level of the dataset."""
    for groups, index in (
        (ds.get("PerFrameFunctionalGroupsSequence"), frame),
        (ds.get("SharedFunctionalGroupsSequence"), 0),
    ):
        if groups and index < len(groups):
            items = groups[index].get(sequence)
            if items and keyword in items[0]:
                return items[0].get(keyword)
    return ds.get(keyword)


def _first(value: object) -> object:
    """The first of a multi-valued attribute (several windows: the first is the default)."""
    if isinstance(value, list | tuple | MultiValue):
        return value[0] if len(value) else None
    return value


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _invert(ds: Dataset, shown: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        return np.subtract(255, shown, dtype=np.uint8)
    return shown


def _scale_to_u8(values: np.ndarray, low: float, high: float) -> npt.NDArray[np.uint8]:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def to_u8(rgb: np.ndarray, bits_stored: int | None) -> npt.NDArray[np.uint8]:
    """Colour samples to 8 bits: over ``bits_stored``, or the array's own integer width."""
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    bits = bits_stored if bits_stored is not None else rgb.dtype.itemsize * 8
    return _scale_to_u8(rgb, 0.0, float(2**bits - 1))
