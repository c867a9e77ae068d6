"""What a protocol hands the runtime, and what it gets back. Plain data, no FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.engine.cam.explain import CamMap
from service.engine.imaging.images import DecodedImage
from service.engine.models.preprocess import Geometry
from service.engine.plan import ExplainPlan

UpsampledSize = Literal["none", "input", "original"]
OverlayKind = Literal["none", "png", "jpeg", "webp", "panel", "dicom"]
#: How maps are sent: nested lists, or base64 of little-endian float32.
MapEncoding = Literal["list", "base64"]


@dataclass(frozen=True)
class OutputOptions:
    """Which renderings to produce for each explanation."""

    heatmap: bool = True  # the raw feature-grid map (normalised and unnormalised range)
    upsampled: UpsampledSize = "none"  # the [0, 1] map at the model input or original size
    # overlay on the original image, the 4-part panel (PNG), or a DICOM Secondary Capture
    overlay: OverlayKind = "png"
    colormap: str = "jet"
    alpha: float = 0.5


@dataclass(frozen=True)
class PredictJob:
    """Classify one image."""

    image: DecodedImage


@dataclass(frozen=True)
class ExplainJob:
    """Explain one image as ``plan`` says (layers, classes, method, post-processing, scores,
    resolved against the model), with the renderings of ``outputs``."""

    image: DecodedImage
    plan: ExplainPlan
    outputs: OutputOptions = field(default_factory=OutputOptions)


@dataclass
class Timings:
    """Seconds spent in each stage for one image."""

    preprocess: float = 0.0
    queue: float = 0.0
    compute: float = 0.0
    render: float = 0.0
    batch_size: int = 1


@dataclass
class PredictOutcome:
    probabilities: np.ndarray  # (num_classes,) float32
    geometry: Geometry
    timings: Timings


@dataclass
class RenderedMap:
    """One explanation with the renderings the caller asked for."""

    cam: CamMap
    upsampled: np.ndarray | None = None  # (H, W) float32 in [0, 1]
    upsampled_scale: float | None = None  # original maps: map pixels per upload pixel
    overlay: bytes | None = None
    overlay_media_type: str | None = None
    overlay_size: tuple[int, int] | None = None  # (width, height)


@dataclass
class ExplainOutcome:
    probabilities: np.ndarray  # (num_classes,) float32
    geometry: Geometry
    maps: list[RenderedMap]
    timings: Timings
