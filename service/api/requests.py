"""Request bodies of the HTTP API: parameters, multipart forms, JSON bodies, and their limits.

Uploads arrive as ``multipart/form-data`` (:class:`PredictForm`, :class:`ExplainForm`) or as
``application/json`` (:class:`PredictJsonRequest`, :class:`ExplainJsonRequest`); both carry the
same parameters (:class:`PredictParams`, :class:`ExplainParams`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.api.responses import Encoding
from service.engine.dicom import DisplayOptions, Window
from service.engine.explain import MAX_PROBABILITY_TARGETS
from service.engine.images import ACCEPTED_FORMATS, UPLOAD_FORMATS
from service.engine.methods import METHOD_NAMES, METHODS
from service.engine.render import COLORMAPS, DEFAULT_COLORMAP
from service.runtime.jobs import OverlayKind, UpsampledSize

#: Cost bounds of one explain request, per image.
MAX_LAYERS = 8
MAX_TARGETS = 16
MAX_EXPLAIN_TOP_K = 10
#: Bounds of a requested DICOM window (the span of 32-bit stored values) and frame number.
MAX_WINDOW_VALUE = 2.0**32
MAX_FRAME = 2**31 - 2

#: Media types an uploaded image may declare.
IMAGE_MEDIA_TYPES = (
    *(f"image/{fmt.lower()}" for fmt in ACCEPTED_FORMATS),
    "application/dicom",
)

_METHODS_DOC = "; ".join(
    f"'{name}', {METHODS[name].description.rstrip('.')}" for name in METHOD_NAMES
)
_FORMATS_DOC = ", ".join(UPLOAD_FORMATS)


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


class DisplayParams(BaseModel):
    """How DICOM uploads are shown to the model (and in overlays); other images ignore them."""

    model_config = ConfigDict(extra="forbid")

    window_center: float | None = Field(
        default=None,
        ge=-MAX_WINDOW_VALUE,
        le=MAX_WINDOW_VALUE,
        allow_inf_nan=False,
        description="DICOM only: window centre, in the units after the modality LUT (CT:"
        " Hounsfield units), instead of the file's window. Give window_width with it.",
        examples=[40],
    )
    window_width: float | None = Field(
        default=None,
        ge=1,
        le=MAX_WINDOW_VALUE,
        allow_inf_nan=False,
        description="DICOM only: window width (at least 1), with window_center.",
        examples=[400],
    )
    frame: int = Field(
        default=0,
        ge=0,
        le=MAX_FRAME,
        description="DICOM only: the frame of a multi-frame object to use, from 0.",
    )

    @model_validator(mode="after")
    def _window_pair(self) -> DisplayParams:
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("give window_center and window_width together, or neither")
        return self

    def display(self) -> DisplayOptions:
        """The engine's display options for DICOM uploads."""
        window = None
        if self.window_center is not None and self.window_width is not None:
            window = Window(self.window_center, self.window_width)
        return DisplayOptions(window=window, frame=self.frame)


class PredictParams(DisplayParams):
    """Parameters of ``predict``, as multipart form fields or JSON members."""

    top_k: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="How many of the most probable classes to return (capped at the number of"
        " classes).",
        examples=[5],
    )


class ExplainParams(DisplayParams):
    """Parameters of ``explain``, as multipart form fields or JSON members."""

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
    min_probability: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Instead of target or top_k: explain every class whose probability reaches"
        f" this (most probable first, at most {MAX_PROBABILITY_TARGETS}; possibly none). Meant"
        " for multi-label (sigmoid) models.",
        examples=[0.5],
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
        description="Overlay of the heatmap on the uploaded image (a DICOM one as displayed,"
        " windowed): its encoding, 'panel' for the four-part figure (original, overlay, heatmap,"
        " colour scale; PNG), 'dicom' for a DICOM Secondary Capture object filed under the"
        " uploaded DICOM object's study (DICOM uploads only), or 'none'.",
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
    f"The image file(s) ({_FORMATS_DOC}; DICOM is recognised by its content, with or without"
    " the application/dicom type); repeat the field for several images, each gets its own"
    " result, in order."
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
        " URL-safe alphabet; a 'data:image/...;base64,' or 'data:application/dicom;base64,'"
        " prefix is accepted).",
        examples=["iVBORw0KGgoAAAANSUhEUgAA..."],
    )


class PredictJsonRequest(PredictParams):
    """``application/json`` body of predict, for clients that do not speak multipart."""

    images: list[ImageData] = Field(min_length=1, description="The images, in order.")


class ExplainJsonRequest(ExplainParams):
    """``application/json`` body of explain, for clients that do not speak multipart."""

    images: list[ImageData] = Field(min_length=1, description="The images, in order.")


JsonRequest = PredictJsonRequest | ExplainJsonRequest

#: The upload bodies, documented as components by the app (FastAPI cannot infer them).
REQUEST_SCHEMAS: tuple[type[BaseModel], ...] = (
    PredictForm,
    PredictJsonRequest,
    ExplainForm,
    ExplainJsonRequest,
)
