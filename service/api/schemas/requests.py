"""Request bodies of the HTTP API: parameters, multipart forms, JSON bodies, and their limits.

Uploads arrive as ``multipart/form-data`` (:class:`PredictForm`, :class:`ExplainForm`) or as
``application/json`` (:class:`PredictJsonRequest`, :class:`ExplainJsonRequest`); both carry the
same parameters (:class:`PredictParams`, :class:`ExplainParams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.api.schemas.responses import Encoding
from service.engine.cam.explain import MAX_PROBABILITY_TARGETS
from service.engine.cam.methods import METHOD_NAMES, METHODS
from service.engine.faithfulness.scores import (
    DEFAULT_CURVE_STEP,
    DEFAULT_ROAD_PERCENTILES,
    SCORE_DESCRIPTIONS,
    SCORE_NAMES,
    ScoreName,
)
from service.engine.imaging.dicom_display import DisplayOptions, Window
from service.engine.imaging.images import ACCEPTED_FORMATS, UPLOAD_FORMATS
from service.engine.pictures.overlays import COLORMAPS, DEFAULT_COLORMAP
from service.engine.plan import ExplainParameters, class_from_text
from service.runtime.jobs import OutputOptions, OverlayKind, UpsampledSize

#: Cost bounds of one explain request, per image.
MAX_LAYERS = 8
MAX_TARGETS = 16
MAX_EXPLAIN_TOP_K = 10
#: Bounds of a requested DICOM window (the span of 32-bit stored values) and frame number.
MAX_WINDOW_VALUE = 2.0**32
MAX_FRAME = 2**31 - 2
#: Bounds of the faithfulness scores' parameters (with the score cap's default, the costliest
#: request the schema allows on a small model stays under it: see the README).
MAX_ROAD_PERCENTILES = 9
MIN_CURVE_STEP = 0.02
MAX_CURVE_STEP = 0.5

#: An 8x8 PNG, base64-encoded: the image of the JSON request examples (a real one, so that an
#: example sent as it is gets an answer).
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8UaHBgA0wMeAAg1MCAB4nAXgllso1"
    "AAAAAElFTkSuQmCC"
)
#: Media types an uploaded image may declare.
IMAGE_MEDIA_TYPES = (
    *(f"image/{fmt.lower()}" for fmt in ACCEPTED_FORMATS),
    "application/dicom",
)

_METHODS_DOC = "; ".join(
    f"'{name}', {METHODS[name].description.rstrip('.')}" for name in METHOD_NAMES
)
_FORMATS_DOC = ", ".join(UPLOAD_FORMATS)
_SCORES_DOC = "; ".join(f"'{name}', {SCORE_DESCRIPTIONS[name]}" for name in SCORE_NAMES)


def _one_of(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} '{value}'; use one of: {', '.join(allowed)}")
    return value


def _as_list(value: object) -> object:
    """Accept a single value where a list is expected (JSON ``"layer": "layer4"``)."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value


def _one_or_many(schema: dict[str, Any]) -> None:
    """The schema of a repeatable parameter that also takes one value: an array of items, or
    one item (what :func:`_as_list` accepts)."""
    array = {key: schema.pop(key) for key in ("type", "items", "maxItems") if key in schema}
    schema["anyOf"] = [array, dict(array["items"])]


def _integral(value: object) -> object:
    """JSON Schema counts 2.0 as an integer: take it as one (strict JSON parsing would not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _form_flag(value: object, info: ValidationInfo) -> object:
    """A form field says a boolean as 'true' or 'false'; a JSON body uses a JSON boolean."""
    if isinstance(value, str) and (info.context or {}).get(FORM_CONTEXT):
        if value in ("true", "false"):
            return value == "true"
        raise ValueError("must be 'true' or 'false'")
    return value


#: The validation context key that says the values come from form fields (strings).
FORM_CONTEXT = "form"
#: A boolean parameter: 'true'/'false' in a form, true/false in JSON, nothing else.
Flag = Annotated[bool, BeforeValidator(_form_flag)]
#: An integer parameter: in JSON bodies an integer-valued number, never a string or a boolean.
Integer = Annotated[int, BeforeValidator(_integral)]
#: An index (a class's, a layer's): the bound goes before the validator, or pydantic writes it
#: into the schema raw ("ge" instead of "minimum").
Index = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
#: A ROAD percentile.
Percentile = Annotated[int, Field(ge=1, le=99), BeforeValidator(_integral)]


#: window_center and window_width come together, or neither does (absent or null).
_WINDOW_PAIR: dict[str, Any] = {
    "anyOf": [
        {
            "required": ["window_center", "window_width"],
            "properties": {"window_center": {"type": "number"}, "window_width": {"type": "number"}},
        },
        {"properties": {"window_center": {"type": "null"}, "window_width": {"type": "null"}}},
    ]
}
#: layer and layer_index are alternatives: a request gives one of them, not both (a null
#: layer_index is none). Said without 'not', which schemathesis cannot combine with binary parts.
_LAYER_CHOICE: dict[str, Any] = {
    "anyOf": [{"properties": {"layer": False}}, {"properties": {"layer_index": {"type": "null"}}}]
}
#: min_probability chooses the classes instead of target and top_k: not with either of them.
_CLASS_CHOICE: dict[str, Any] = {
    "anyOf": [
        {"properties": {"min_probability": {"type": "null"}}},
        {"properties": {"target": False, "top_k": False}},
    ]
}


class DisplayParams(BaseModel):
    """How DICOM uploads are shown to the model (and in overlays); other images ignore them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [_WINDOW_PAIR]})

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
    frame: Integer = Field(
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

    top_k: Integer = Field(
        default=5,
        ge=1,
        le=1000,
        description="How many of the most probable classes to return (capped at the number of"
        " classes).",
        examples=[5],
    )


class ExplainParams(DisplayParams):
    """Parameters of ``explain``, as multipart form fields or JSON members."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"allOf": [_WINDOW_PAIR, _LAYER_CHOICE, _CLASS_CHOICE]},
    )

    layer: list[str] = Field(
        default_factory=list,
        max_length=MAX_LAYERS,
        description="Layer(s) to explain, by module path (repeatable: one explanation per layer)."
        " GET /v1/models/{model}/layers lists them. Default: the model's default layer.",
        examples=[["layer4"]],
        json_schema_extra=_one_or_many,
    )
    layer_index: Index | None = Field(
        default=None,
        description="Alternative to 'layer': the original script's layer_idx, counting the"
        " model's top-level children back from the classifier (ResNet: 2 = layer4, 5 = layer1).",
    )
    target: list[Index | str] = Field(
        default_factory=list,
        max_length=MAX_TARGETS,
        description="Class(es) to explain, by index or label (repeatable: one explanation per"
        " class). Default: the top_k predicted classes.",
        examples=[["tabby"]],
        json_schema_extra=_one_or_many,
    )
    top_k: Integer = Field(
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
        " uploaded DICOM object's study (DICOM uploads only), or 'none'. Parts of the image"
        " the model never saw (cropped away: outside `input_box`) are drawn grey with diagonal"
        " stripes, blended like the heatmap, not in the colour of a low value.",
    )
    heatmap: Flag = Field(
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
    scores: list[ScoreName] = Field(
        default_factory=list,
        max_length=len(SCORE_NAMES),
        description="Faithfulness scores to compute for each map (repeatable), returned in each"
        f" explanation's 'scores'. p is the target's probability, M the map at the input size, x"
        f" the input: {_SCORES_DOC}. They cost forward passes (capped per request).",
        examples=[["confidence_change", "road"]],
        json_schema_extra=_one_or_many,
    )
    road_percentiles: list[Percentile] = Field(
        default_factory=lambda: list(DEFAULT_ROAD_PERCENTILES),
        max_length=MAX_ROAD_PERCENTILES,
        description="For the 'road' score: the percentiles of the map at which pixels are"
        " removed (repeatable; two forward passes each). None given (an absent form field, or"
        " an empty list) means the default.",
        examples=[list(DEFAULT_ROAD_PERCENTILES)],
        json_schema_extra=_one_or_many,
    )
    curve_step: float = Field(
        default=DEFAULT_CURVE_STEP,
        ge=MIN_CURVE_STEP,
        le=MAX_CURVE_STEP,
        description="For the 'deletion' and 'insertion' scores: the fraction of the input's"
        " pixels changed per step of the curve (about 1/curve_step forward passes each).",
        examples=[DEFAULT_CURVE_STEP],
    )

    @field_validator("layer", "target", "scores", "road_percentiles", mode="before")
    @classmethod
    def _single_to_list(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("road_percentiles")
    @classmethod
    def _default_percentiles(cls, value: list[int]) -> list[int]:
        """A form cannot send an empty list, only leave the field out: in JSON too, no
        percentiles means the default ones."""
        return value or list(DEFAULT_ROAD_PERCENTILES)

    @field_validator("target")
    @classmethod
    def _form_indices(cls, value: list[int | str], info: ValidationInfo) -> list[int | str]:
        """A form field is text: digits there are a class index. In JSON an index is a number
        and a string is always a label."""
        if (info.context or {}).get(FORM_CONTEXT):
            return [class_from_text(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _one_of(value, METHOD_NAMES, "method")

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, value: str) -> str:
        return _one_of(value, COLORMAPS, "colormap")

    def parameters(self) -> ExplainParameters:
        """What to explain, for the engine's plan: a parameter left out is None there."""
        given = self.model_fields_set
        return ExplainParameters(
            layers=self.layer if "layer" in given else None,
            layer_index=self.layer_index,
            targets=self.target if "target" in given else None,
            top_k=self.top_k if "top_k" in given else None,
            min_probability=self.min_probability,
            method=self.method,
            threshold=self.threshold,
            scores=self.scores,
            road_percentiles=self.road_percentiles,
            curve_step=self.curve_step,
        )

    def outputs(self) -> OutputOptions:
        """The renderings asked for."""
        return OutputOptions(
            heatmap=self.heatmap,
            upsampled=self.upsampled,
            overlay=self.overlay,
            colormap=self.colormap,
            alpha=self.alpha,
        )


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
        examples=[EXAMPLE_PNG_BASE64],
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
