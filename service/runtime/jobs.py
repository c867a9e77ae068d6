"""What the HTTP layer hands the runtime, and what it gets back. Plain data, no FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.engine.cam.explain import CamMap, PostProcess
from service.engine.faithfulness.scores import ScoreOptions
from service.engine.imaging.images import DecodedImage
from service.engine.models.preprocess import Geometry

UpsampledSize = Literal["none", "input", "original"]
OverlayKind = Literal["none", "png", "jpeg", "webp", "panel", "dicom"]


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
    """Explain one image. ``layers`` are resolved names; ``targets`` resolved indices, or None
    for every class reaching ``min_probability`` when it is given, else the ``top_k`` predicted
    classes."""

    image: DecodedImage
    layers: tuple[str, ...]
    targets: tuple[int, ...] | None = None
    top_k: int = 1
    min_probability: float | None = None
    method: str = "gradcam"
    post: PostProcess = field(default_factory=PostProcess)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    scores: ScoreOptions | None = None  # faithfulness scores of each map


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
