"""Request and response bodies of the HTTP API, and their construction from runtime results.

Maps are sent as arrays, never as Python loops over elements: ``list`` encoding is
``ndarray.tolist()`` (rows of floats), ``base64`` encoding is the little-endian float32 bytes
(``ndarray.astype('<f4').tobytes()``) in row-major order, with ``shape`` giving (height, width).
Both decode to the same array exactly.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.problems import Problem
from service.engine.explain import CamMap
from service.engine.images import ACCEPTED_FORMATS, DecodedImage
from service.engine.layers import LayerInfo
from service.engine.methods import METHOD_NAMES, METHODS
from service.engine.models import LoadedModel
from service.engine.render import COLORMAPS, DEFAULT_COLORMAP
from service.engine.spec import ModelSpec
from service.runtime.jobs import ExplainOutcome, OverlayKind, PredictOutcome, Timings, UpsampledSize

Encoding = Literal["list", "base64"]
ModelState = Literal["loading", "ready", "failed"]

#: Cost bounds of one explain request, per image.
MAX_LAYERS = 8
MAX_TARGETS = 16
MAX_EXPLAIN_TOP_K = 10
#: Predictions listed with each explained image (at least; more when ``top_k`` asks for more).
EXPLAIN_PREDICTIONS = 5

_METHODS_DOC = "; ".join(
    f"'{name}', {METHODS[name].description.rstrip('.')}" for name in METHOD_NAMES
)
_FORMATS_DOC = ", ".join(ACCEPTED_FORMATS)


def _one_of(value: str, allowed: Sequence[str], what: str) -> str:
    folded = value.strip().lower()
    if folded not in allowed:
        raise ValueError(f"unknown {what} '{value}'; use one of: {', '.join(allowed)}")
    return folded


def _as_list(value: object) -> object:
    """Accept a single value where a list is expected (JSON ``"layer": "layer4"``)."""
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    return value


# ============================================================================ requests


class PredictParams(BaseModel):
    """Parameters of ``predict``, as multipart form fields or JSON members."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="How many of the most probable classes to return (capped at the number of"
        " classes).",
        examples=[5],
    )


class ExplainParams(BaseModel):
    """Parameters of ``explain``, as multipart form fields or JSON members."""

    model_config = ConfigDict(extra="forbid")

    layer: list[str] = Field(
        default_factory=list,
        max_length=MAX_LAYERS,
        description="Layer(s) to explain, by module path (repeatable: one explanation per layer)."
        " GET /v1/models/{model}/layers lists them. Default: the model's default layer.",
        examples=[["layer4"]],
    )
    layer_index: int | None = Field(
        default=None,
        description="Alternative to 'layer': the original script's layer_idx, counting the"
        " model's top-level children back from the classifier (ResNet: 2 = layer4, 5 = layer1).",
        examples=[2],
    )
    target: list[int | str] = Field(
        default_factory=list,
        max_length=MAX_TARGETS,
        description="Class(es) to explain, by index or label (repeatable: one explanation per"
        " class). Default: the top_k predicted classes.",
        examples=[["tabby"]],
    )
    top_k: int = Field(
        default=1,
        ge=1,
        le=MAX_EXPLAIN_TOP_K,
        description="When no target is given, explain this many of the most probable classes.",
    )
    method: str = Field(
        default="gradcam",
        description=f"CAM method: {_METHODS_DOC}.",
        json_schema_extra={"enum": list(METHOD_NAMES)},
    )
    threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="If given, values under threshold x max are raised to it (the original"
        " script's 'adaptable threshold', e.g. 0.125) instead of the paper's ReLU, so the"
        " picture stays visible under the overlay.",
        examples=[0.125],
    )
    colormap: str = Field(
        default=DEFAULT_COLORMAP,
        description="Colour scale of the overlay (jet: blue low, red high).",
        json_schema_extra={"enum": list(COLORMAPS)},
    )
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Opacity of the heatmap in the overlay."
    )
    overlay: OverlayKind = Field(
        default="png",
        description="Overlay of the heatmap on the uploaded image: its encoding, 'panel' for the"
        " four-part figure (original, overlay, heatmap, colour scale; PNG), or 'none'.",
    )
    heatmap: bool = Field(
        default=True,
        description="Include the map on the layer's feature grid, normalised to [0, 1].",
    )
    upsampled: UpsampledSize = Field(
        default="none",
        description="Also include the [0, 1] map resized to the model input ('input') or to the"
        " uploaded image ('original', pixels the model never saw are 0).",
    )
    encoding: Encoding = Field(
        default="list",
        description="How maps are sent: 'list' (nested JSON arrays) or 'base64' (little-endian"
        " float32, row-major; much smaller).",
    )

    @field_validator("layer", "target", mode="before")
    @classmethod
    def _single_to_list(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _one_of(value, METHOD_NAMES, "method")

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, value: str) -> str:
        return _one_of(value, COLORMAPS, "colormap")


_IMAGE_FIELD_DOC = (
    f"The image file(s) ({_FORMATS_DOC}); repeat the field for several images, each gets its"
    " own result, in order."
)


class PredictForm(PredictParams):
    """``multipart/form-data`` body of predict (``curl -F image=@cat.jpg -F top_k=3``)."""

    image: list[bytes] = Field(min_length=1, description=_IMAGE_FIELD_DOC)


class ExplainForm(ExplainParams):
    """``multipart/form-data`` body of explain (``curl -F image=@cat.jpg -F layer=layer4``)."""

    image: list[bytes] = Field(min_length=1, description=_IMAGE_FIELD_DOC)


class ImageData(BaseModel):
    """One image in a JSON request."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(
        description=f"The image file's bytes ({_FORMATS_DOC}), base64-encoded (standard or"
        " URL-safe alphabet; a 'data:image/...;base64,' prefix is accepted).",
        examples=["iVBORw0KGgoAAAANSUhEUgAA..."],
    )


class PredictJsonRequest(PredictParams):
    """``application/json`` body of predict, for clients that do not speak multipart."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": [{"data": "iVBORw0KGgo..."}], "top_k": 3}]},
    )

    images: list[ImageData] = Field(min_length=1, description="The images, in order.")


class ExplainJsonRequest(ExplainParams):
    """``application/json`` body of explain, for clients that do not speak multipart."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": [{"data": "iVBORw0KGgo..."}],
                    "layer": ["layer4"],
                    "target": ["tabby"],
                    "method": "gradcam",
                    "overlay": "png",
                    "encoding": "base64",
                }
            ]
        },
    )

    images: list[ImageData] = Field(min_length=1, description="The images, in order.")


# ============================================================================ models


class WeightsSchema(BaseModel):
    source: Literal["hub", "safetensors", "state_dict", "random"] = Field(
        description="Where the weights came from."
    )
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
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ModelInfo(BaseModel):
    """A served model. Fields other than name, architecture and state are known once loaded."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "example": {
                "name": "resnet50",
                "architecture": "resnet50",
                "state": "ready",
                "ready": True,
                "num_classes": 1000,
                "labels": ["tench, Tinca tinca", "goldfish, Carassius auratus", "..."],
                "input_size": [224, 224],
                "preprocessing": {
                    "input_size": [224, 224],
                    "interpolation": "bicubic",
                    "crop_pct": 0.95,
                    "crop_mode": "center",
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                },
                "default_layer": "layer4",
                "device": "cuda:0",
                "replicas": 1,
                "weights": {"source": "hub", "location": "resnet50", "random": False},
            }
        },
    )

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
    device: str | None = None
    replicas: int = 0
    weights: WeightsSchema | None = None

    @classmethod
    def pending(
        cls, spec: ModelSpec, state: ModelState, error: str | None, replicas: int = 0
    ) -> ModelInfo:
        return cls(
            name=spec.name,
            architecture=spec.architecture,
            state=state,
            ready=False,
            error=error,
            replicas=replicas,
        )

    @classmethod
    def from_model(cls, model: LoadedModel, replicas: int) -> ModelInfo:
        weights = model.weights
        return cls(
            name=model.name,
            architecture=model.spec.architecture,
            state="ready",
            ready=True,
            num_classes=model.num_classes,
            labels=list(model.labels),
            input_size=model.input_size,
            preprocessing=PreprocessingSchema(**dataclasses.asdict(model.preprocessing)),
            default_layer=model.default_layer,
            device=str(model.device),
            replicas=replicas,
            weights=WeightsSchema(
                source=weights.source,
                location=weights.location,
                random=weights.random,
                note=weights.note,
            ),
        )


class ModelList(BaseModel):
    models: list[ModelInfo]


class LayerSchema(BaseModel):
    """A layer a CAM can be computed on."""

    name: str = Field(description="Module path, e.g. 'layer4' or 'blocks.11.norm1'.")
    module_type: str = Field(description="Module class name.")
    output_shape: list[int] = Field(description="Output shape per image, e.g. [2048, 7, 7].")
    layout: Literal["channels_first", "channels_last", "tokens"]
    grid: tuple[int, int] = Field(description="(height, width) of the maps this layer gives.")
    channels: int
    prefix_tokens: int = Field(description="Leading tokens dropped (tokens layout only).")
    layer_index: int | None = Field(
        default=None, description="The original script's layer_idx, for top-level children."
    )

    @classmethod
    def from_info(cls, info: LayerInfo) -> LayerSchema:
        return cls(
            name=info.name,
            module_type=info.module_type,
            output_shape=list(info.output_shape),
            layout=info.layout,
            grid=info.grid,
            channels=info.channels,
            prefix_tokens=info.prefix_tokens,
            layer_index=info.layer_index,
        )


class LayerList(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "example": {
                "model": "resnet50",
                "default_layer": "layer4",
                "layers": [
                    {
                        "name": "layer4",
                        "module_type": "Sequential",
                        "output_shape": [2048, 7, 7],
                        "layout": "channels_first",
                        "grid": [7, 7],
                        "channels": 2048,
                        "prefix_tokens": 0,
                        "layer_index": 2,
                    }
                ],
            }
        },
    )

    model: str
    default_layer: str
    layers: list[LayerSchema]


# ============================================================================ results


class OriginalImage(BaseModel):
    width: int
    height: int
    mode: str = Field(description="Pillow mode the file decoded to, e.g. RGB, L, I;16, CMYK.")
    format: str = Field(description="Container format, e.g. JPEG.")

    @classmethod
    def from_decoded(cls, image: DecodedImage) -> OriginalImage:
        return cls(
            width=image.width, height=image.height, mode=image.original_mode, format=image.format
        )


class Prediction(BaseModel):
    index: int = Field(description="Class index.")
    label: str
    probability: float = Field(description="Softmax probability.")


class TimingsSchema(BaseModel):
    """Where the time went for one image, in milliseconds."""

    decode_ms: float
    preprocess_ms: float
    queue_ms: float = Field(description="Waiting for a worker (includes batching).")
    compute_ms: float = Field(description="The batch's model time on the device.")
    render_ms: float
    batch_size: int = Field(description="Images in the device batch this image ran in.")

    @classmethod
    def from_timings(cls, timings: Timings, decode_s: float) -> TimingsSchema:
        return cls(
            decode_ms=_ms(decode_s),
            preprocess_ms=_ms(timings.preprocess),
            queue_ms=_ms(timings.queue),
            compute_ms=_ms(timings.compute),
            render_ms=_ms(timings.render),
            batch_size=timings.batch_size,
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def top_predictions(model: LoadedModel, probabilities: np.ndarray, k: int) -> list[Prediction]:
    k = max(1, min(k, probabilities.shape[-1]))
    order = np.argsort(-probabilities, kind="stable")[:k]
    values = probabilities[order].tolist()
    return [
        Prediction(index=int(i), label=model.labels[int(i)], probability=p)
        for i, p in zip(order.tolist(), values, strict=True)
    ]


def weights_warnings(model: LoadedModel) -> list[str]:
    if not model.weights.random:
        return []
    why = f" ({model.weights.note})" if model.weights.note else ""
    return [
        f"Model '{model.name}' runs with RANDOM weights{why}: its predictions and explanations"
        " are meaningless."
    ]


class ImagePrediction(BaseModel):
    index: int = Field(description="0-based position of the image in the request.")
    original: OriginalImage
    predictions: list[Prediction]
    timings: TimingsSchema


class _ModelAnswer(BaseModel):
    """What every predict/explain answer starts with: which model, and how far to trust it."""

    model: str
    random_weights: bool = Field(description="True when the model's weights are random.")
    warnings: list[str] = Field(default_factory=list)


class PredictResponse(_ModelAnswer):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "example": {
                "model": "resnet50",
                "random_weights": False,
                "warnings": [],
                "results": [
                    {
                        "index": 0,
                        "original": {"width": 640, "height": 480, "mode": "RGB", "format": "JPEG"},
                        "predictions": [
                            {"index": 281, "label": "tabby, tabby cat", "probability": 0.62},
                            {"index": 285, "label": "Egyptian cat", "probability": 0.21},
                        ],
                        "timings": {
                            "decode_ms": 3.1,
                            "preprocess_ms": 2.4,
                            "queue_ms": 4.9,
                            "compute_ms": 18.0,
                            "render_ms": 0.0,
                            "batch_size": 2,
                        },
                    }
                ],
            }
        },
    )

    results: list[ImagePrediction] = Field(description="One per image, in request order.")

    @classmethod
    def build(
        cls,
        model: LoadedModel,
        images: Sequence[DecodedImage],
        outcomes: Sequence[PredictOutcome],
        top_k: int,
        decode_s: float,
    ) -> PredictResponse:
        return cls(
            model=model.name,
            random_weights=model.weights.random,
            warnings=weights_warnings(model),
            results=[
                ImagePrediction(
                    index=i,
                    original=OriginalImage.from_decoded(image),
                    predictions=top_predictions(model, outcome.probabilities, top_k),
                    timings=TimingsSchema.from_timings(outcome.timings, decode_s),
                )
                for i, (image, outcome) in enumerate(zip(images, outcomes, strict=True))
            ],
        )


class MapArray(BaseModel):
    """A float32 map: nested lists, or base64 of little-endian float32 in row-major order."""

    shape: tuple[int, int] = Field(description="(height, width).")
    dtype: Literal["float32"] = "float32"
    encoding: Encoding
    data: list[list[float]] | str

    @classmethod
    def encode(cls, array: np.ndarray, encoding: Encoding) -> MapArray:
        values = np.ascontiguousarray(array, dtype="<f4")
        height, width = values.shape
        data: list[list[float]] | str
        if encoding == "base64":
            data = base64.b64encode(values.tobytes()).decode("ascii")
        else:
            data = values.tolist()
        # Built by us from a float32 array: skip re-validating every element.
        return cls.model_construct(
            shape=(height, width), dtype="float32", encoding=encoding, data=data
        )


class UpsampledMap(MapArray):
    """The [0, 1] map resized to the model input or to the uploaded image."""

    size: Literal["input", "original"] = Field(description="Which size the map was resized to.")

    @classmethod
    def encode_as(
        cls, array: np.ndarray, encoding: Encoding, size: Literal["input", "original"]
    ) -> UpsampledMap:
        base = MapArray.encode(array, encoding)
        return cls.model_construct(**dict(base), size=size)


class Overlay(BaseModel):
    media_type: str = Field(description="e.g. image/png.")
    width: int
    height: int
    data: str = Field(description="The encoded picture, base64.")


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


def map_warnings(cam: CamMap, label: str) -> list[str]:
    """Say so when a map carries no information, rather than return a silent blank."""
    if cam.raw_max > 0:
        return []
    return [
        f"The map is empty: at layer '{cam.layer}' nothing raises the score of '{label}' (all"
        f" values are <= 0 before rectification). Try another layer or method; for class-token"
        f" ViTs the last block's output gets no gradient on its patch tokens (use its norm1)."
    ]


class ImageExplanation(BaseModel):
    index: int = Field(description="0-based position of the image in the request.")
    original: OriginalImage
    predictions: list[Prediction]
    explanations: list[Explanation] = Field(description="Ordered by target, then layer.")
    timings: TimingsSchema


class ExplainResponse(_ModelAnswer):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "example": {
                "model": "resnet50",
                "random_weights": False,
                "warnings": [],
                "results": [
                    {
                        "index": 0,
                        "original": {"width": 640, "height": 480, "mode": "RGB", "format": "JPEG"},
                        "predictions": [
                            {"index": 281, "label": "tabby, tabby cat", "probability": 0.62}
                        ],
                        "explanations": [
                            {
                                "target": {
                                    "index": 281,
                                    "label": "tabby, tabby cat",
                                    "probability": 0.62,
                                    "logit": 11.3,
                                },
                                "layer": "layer4",
                                "method": "gradcam",
                                "heatmap": {
                                    "shape": [2, 2],
                                    "dtype": "float32",
                                    "encoding": "list",
                                    "data": [[0.0, 0.25], [0.5, 1.0]],
                                },
                                "raw_heatmap": {
                                    "shape": [2, 2],
                                    "dtype": "float32",
                                    "encoding": "list",
                                    "data": [[0.0, 0.6], [1.2, 2.4]],
                                },
                                "raw_range": {"min": -0.8, "max": 2.4},
                                "overlay": {
                                    "media_type": "image/png",
                                    "width": 640,
                                    "height": 480,
                                    "data": "iVBORw0KGgo...",
                                },
                            }
                        ],
                        "timings": {
                            "decode_ms": 3.1,
                            "preprocess_ms": 2.4,
                            "queue_ms": 4.9,
                            "compute_ms": 21.5,
                            "render_ms": 9.8,
                            "batch_size": 1,
                        },
                    }
                ],
            }
        },
    )

    results: list[ImageExplanation] = Field(description="One per image, in request order.")

    @classmethod
    def build(
        cls,
        model: LoadedModel,
        images: Sequence[DecodedImage],
        outcomes: Sequence[ExplainOutcome],
        params: ExplainParams,
        decode_s: float,
    ) -> ExplainResponse:
        results = []
        for i, (image, outcome) in enumerate(zip(images, outcomes, strict=True)):
            explanations = []
            for rendered in outcome.maps:
                cam = rendered.cam
                upsampled = None
                if rendered.upsampled is not None and params.upsampled != "none":
                    upsampled = UpsampledMap.encode_as(
                        rendered.upsampled, params.encoding, params.upsampled
                    )
                overlay = None
                if rendered.overlay is not None and rendered.overlay_size is not None:
                    overlay = Overlay(
                        media_type=rendered.overlay_media_type or "application/octet-stream",
                        width=rendered.overlay_size[0],
                        height=rendered.overlay_size[1],
                        data=base64.b64encode(rendered.overlay).decode("ascii"),
                    )
                explanations.append(
                    Explanation(
                        target=Target(
                            index=cam.target,
                            label=model.labels[cam.target],
                            probability=cam.probability,
                            logit=cam.logit,
                        ),
                        layer=cam.layer,
                        method=cam.method,
                        heatmap=(
                            MapArray.encode(cam.grid_normalized, params.encoding)
                            if params.heatmap
                            else None
                        ),
                        raw_heatmap=(
                            MapArray.encode(cam.grid, params.encoding) if params.heatmap else None
                        ),
                        raw_range=ValueRange(min=cam.raw_min, max=cam.raw_max),
                        upsampled=upsampled,
                        overlay=overlay,
                        warnings=map_warnings(cam, model.labels[cam.target]),
                    )
                )
            results.append(
                ImageExplanation(
                    index=i,
                    original=OriginalImage.from_decoded(image),
                    predictions=top_predictions(
                        model, outcome.probabilities, max(EXPLAIN_PREDICTIONS, params.top_k)
                    ),
                    explanations=explanations,
                    timings=TimingsSchema.from_timings(outcome.timings, decode_s),
                )
            )
        return cls(
            model=model.name,
            random_weights=model.weights.random,
            warnings=weights_warnings(model),
            results=results,
        )


# ============================================================================ health


class ModelStatusSchema(BaseModel):
    state: ModelState
    error: str | None = None
    replicas: int = 0


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "status": "ready",
                "models": {"resnet50": {"state": "ready", "replicas": 1}},
            }
        }
    )

    status: Literal["ready"] = "ready"
    models: dict[str, ModelStatusSchema]


class NotReadyProblem(Problem):
    """503 from /readyz: which models are still loading or failed."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "type": "urn:gradcam-service:problem:not_ready",
                "title": "The service is not ready",
                "status": 503,
                "detail": "1 of 1 models not ready: resnet50 (loading).",
                "code": "not_ready",
                "instance": "/readyz",
                "retry_after_s": 5.0,
                "models": {"resnet50": {"state": "loading", "replicas": 0}},
            }
        }
    )

    models: dict[str, ModelStatusSchema]
