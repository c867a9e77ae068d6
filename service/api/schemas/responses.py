"""Response bodies of the HTTP API: plain data, built by :mod:`service.api.answers`.

Maps are sent as arrays: ``list`` encoding is rows of floats, ``base64`` encoding is the
little-endian float32 bytes in row-major order, with ``shape`` giving (height, width). Both
decode to the same array exactly. The OpenAPI examples of these bodies are in
:mod:`service.api.schemas.examples`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.problems import Problem
from service.engine.faithfulness.scores import ScoreName
from service.engine.models.layers import Layout
from service.engine.models.loaded import WeightsSource
from service.engine.models.spec import Activation
from service.runtime.jobs import MapEncoding
from service.runtime.replicas import ModelState

Encoding = MapEncoding

# ============================================================================ models


class WeightsSchema(BaseModel):
    source: WeightsSource = Field(description="Where the weights came from.")
    location: str | None = Field(default=None, description="Hub architecture or file path.")
    random: bool = Field(
        description="True when the weights are random: predictions and maps are meaningless."
    )
    note: str | None = Field(default=None, description="Why, e.g. a fallback from the hub.")


class PreprocessingSchema(BaseModel):
    input_size: tuple[int, int] = Field(description="(height, width) fed to the network.")
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: list[float] = Field(description="One value per input channel.")
    std: list[float] = Field(description="One value per input channel.")
    channels: int = Field(
        description="Input channels: 3 (RGB) or 1 (grey; colour images become luminance)."
    )


class WorkSchema(BaseModel):
    """What the model's workers are busy with now."""

    queued: int = Field(description="Images waiting for a worker, long jobs included.")
    long_jobs_running: int = Field(
        description="Long jobs (methods that run the model on perturbed inputs, such as"
        " Score-CAM, and faithfulness scores) running now; they run in slices, other requests"
        " are served between them."
    )
    long_jobs_queued: int
    long_jobs_remaining_s: float = Field(
        description="Predicted seconds of what remains of the long jobs running and queued."
    )
    forward_pass_s: float | None = Field(
        default=None,
        description="Seconds per forward pass on this device, as measured (the basis of the"
        " predicted times and of the refusal of jobs that would outlast the deadline).",
    )


class ModelInfo(BaseModel):
    """A served model. Fields other than name, architecture and state are known once loaded."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    architecture: str = Field(description="timm architecture name.")
    state: ModelState = Field(description="loading, ready or failed.")
    ready: bool
    error: str | None = Field(default=None, description="Why loading failed.")
    num_classes: int | None = None
    labels: list[str] | None = Field(default=None, description="Class names, in output order.")
    input_size: tuple[int, int] | None = Field(default=None, description="(height, width).")
    preprocessing: PreprocessingSchema | None = None
    default_layer: str | None = Field(default=None, description="Layer explained by default.")
    activation: Activation | None = Field(
        default=None,
        description="softmax: probabilities over the classes sum to 1; sigmoid: each class has"
        " its own probability (multi-label).",
    )
    device: str | None = None
    replicas: int = 0
    weights: WeightsSchema | None = None
    work: WorkSchema | None = Field(default=None, description="What its workers are busy with.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class LayerSchema(BaseModel):
    """A layer a CAM can be computed on."""

    name: str = Field(description="Module path, e.g. 'layer4' or 'blocks.11.norm1'.")
    module_type: str = Field(description="Module class name.")
    output_shape: list[int] = Field(description="Output shape per image, e.g. [2048, 7, 7].")
    layout: Layout
    grid: tuple[int, int] = Field(description="(height, width) of the maps this layer gives.")
    channels: int
    prefix_tokens: int = Field(description="Leading tokens dropped (tokens layout only).")
    layer_index: int | None = Field(
        default=None, description="The original script's layer_idx, for top-level children."
    )
    stage: bool = Field(
        default=False,
        description="One of the model's feature stages (timm's feature_info, else its top-level"
        " children that give a map): the layers to look at first; the page lists the others"
        " under 'all layers'.",
    )


class LayerList(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    default_layer: str
    layers: list[LayerSchema]


# ============================================================================ results


class WindowSchema(BaseModel):
    """The VOI transform a DICOM frame was shown with."""

    center: float | None = Field(description="Window centre, after the modality LUT (CT: HU).")
    width: float | None = Field(description="Window width; null for a VOI LUT.")
    function: str = Field(description="LINEAR, LINEAR_EXACT, SIGMOID, or LUT.")
    source: str = Field(
        description="Where it came from: 'request' (window_center/window_width), 'file' (the"
        " object's first window), 'voi_lut' (its VOI LUT Sequence), 'percentile' (no window in"
        " the file: the frame's 0.5th-99.5th percentile range) or 'full_range' (8-bit data"
        " without window or rescale: its whole range)."
    )


class DicomSchema(BaseModel):
    """What a DICOM upload was, without any patient data."""

    sop_class: str = Field(description="e.g. 'CT Image Storage'.")
    transfer_syntax: str = Field(description="e.g. 'JPEG 2000 Image Compression'.")
    modality: str | None = Field(description="e.g. CT, CR, DX, MR.")
    photometric_interpretation: str = Field(description="e.g. MONOCHROME2, MONOCHROME1, RGB.")
    bits_stored: int
    rows: int
    columns: int
    number_of_frames: int
    frame: int = Field(description="The frame explained, from 0.")
    window: WindowSchema | None = Field(description="The window applied; null for colour.")


class OriginalImage(BaseModel):
    width: int
    height: int
    mode: str = Field(
        description="Pillow mode the file decoded to, e.g. RGB, L, I;16, CMYK; for DICOM its"
        " photometric interpretation."
    )
    format: str = Field(description="Container format, e.g. JPEG or DICOM.")
    dicom: DicomSchema | None = Field(
        default=None, description="For a DICOM upload: what it was, and how it was shown."
    )


class Prediction(BaseModel):
    index: int = Field(description="Class index.")
    label: str
    probability: float = Field(
        description="Softmax probability, or the class's own sigmoid probability for a"
        " multi-label model (see the model's activation)."
    )


class TimingsSchema(BaseModel):
    """Where the time went for one image, in milliseconds."""

    decode_ms: float
    preprocess_ms: float
    queue_ms: float = Field(description="Waiting for a worker (includes batching).")
    compute_ms: float = Field(description="The batch's model time on the device.")
    render_ms: float
    batch_size: int = Field(description="Images in the device batch this image ran in.")


class ImagePrediction(BaseModel):
    index: int = Field(description="0-based position of the image in the request.")
    original: OriginalImage
    predictions: list[Prediction]
    timings: TimingsSchema


class _ModelAnswer(BaseModel):
    """What every predict/explain answer starts with: which model, and how far to trust it."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    random_weights: bool = Field(description="True when the model's weights are random.")
    warnings: list[str] = Field(default_factory=list)


class PredictResponse(_ModelAnswer):
    results: list[ImagePrediction] = Field(description="One per image, in request order.")


class MapArray(BaseModel):
    """A float32 map: nested lists, or base64 of little-endian float32 in row-major order."""

    shape: tuple[int, int] = Field(description="(height, width).")
    dtype: Literal["float32"] = "float32"
    encoding: Encoding
    data: list[list[float]] | str


class UpsampledMap(MapArray):
    """The [0, 1] map resized to the model input or to the uploaded image."""

    size: Literal["input", "original"] = Field(description="Which size the map was resized to.")
    scale: float | None = Field(
        default=None,
        description="For size 'original': map pixels per pixel of the uploaded image; 1 unless"
        " the image is larger than GRADCAM_MAX_UPSAMPLED_SIDE on its long side (aspect kept).",
    )


class Overlay(BaseModel):
    media_type: str = Field(description="e.g. image/png, or application/dicom.")
    width: int
    height: int
    data: str = Field(
        description="The encoded picture, base64 (for overlay=dicom: a DICOM Part 10 file)."
    )


class Target(BaseModel):
    index: int = Field(description="Class index.")
    label: str
    probability: float
    logit: float = Field(description="The pre-softmax score the map explains.")


class ValueRange(BaseModel):
    min: float
    max: float


class Explanation(BaseModel):
    """One map: one image, one target class, one layer."""

    target: Target
    layer: str
    method: str
    heatmap: MapArray | None = Field(
        default=None, description="The map on the layer's feature grid, normalised to [0, 1]."
    )
    raw_heatmap: MapArray | None = Field(
        default=None,
        description="The same feature-grid map in the layer's own units: rectified (ReLU or"
        " threshold floor) but not normalised. Comparable across images and classes.",
    )
    raw_range: ValueRange = Field(description="Range of the map before rectification/scaling.")
    upsampled: UpsampledMap | None = None
    overlay: Overlay | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="Caveats about this map, e.g. that it is empty (all zero).",
    )
    scores: dict[ScoreName, float] | None = Field(
        default=None,
        description="The faithfulness scores the request asked for ('scores'), by name; null"
        " when it asked for none.",
    )


class InputBox(BaseModel):
    """Where the model's input lies on the uploaded image, in the image's pixel coordinates
    ((0, 0) is its top-left corner). Every map's grid spans this box: parts of the image outside
    it were cropped away; where it reaches past the image, the input was padding."""

    left: float
    top: float
    right: float
    bottom: float


class ImageExplanation(BaseModel):
    index: int = Field(description="0-based position of the image in the request.")
    original: OriginalImage
    input_box: InputBox = Field(
        description="Where the model's input, hence each map's grid, lies on the uploaded"
        " image: what a client needs to resize the feature-grid maps onto the image itself."
    )
    predictions: list[Prediction]
    explanations: list[Explanation] = Field(description="Ordered by target, then layer.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Caveats about this image, e.g. that no class reached min_probability.",
    )
    timings: TimingsSchema


class ExplainResponse(_ModelAnswer):
    results: list[ImageExplanation] = Field(description="One per image, in request order.")


# ============================================================================ health


class ModelStatusSchema(BaseModel):
    state: ModelState
    error: str | None = None
    replicas: int = 0


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    models: dict[str, ModelStatusSchema]


class NotReadyProblem(Problem):
    """503 from /readyz: which models are still loading or failed."""

    models: dict[str, ModelStatusSchema]
