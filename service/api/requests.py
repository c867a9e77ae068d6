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
)

from service.api.responses import Encoding
from service.engine.images import ACCEPTED_FORMATS
from service.engine.methods import METHOD_NAMES, METHODS
from service.engine.render import COLORMAPS, DEFAULT_COLORMAP
from service.runtime.jobs import OverlayKind, UpsampledSize

#: Cost bounds of one explain request, per image.
MAX_LAYERS = 8
MAX_TARGETS = 16
MAX_EXPLAIN_TOP_K = 10

#: An 8x8 PNG, base64-encoded: the image of the JSON request examples (a real one, so that an
#: example sent as it is gets an answer).
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8UaHBgA0wMeAAg1MCAB4nAXgllso1"
    "AAAAAElFTkSuQmCC"
)
#: Media types an uploaded image may declare.
IMAGE_MEDIA_TYPES = tuple(f"image/{fmt.lower()}" for fmt in ACCEPTED_FORMATS)

_METHODS_DOC = "; ".join(
    f"'{name}', {METHODS[name].description.rstrip('.')}" for name in METHOD_NAMES
)
_FORMATS_DOC = ", ".join(ACCEPTED_FORMATS)


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


class PredictParams(BaseModel):
    """Parameters of ``predict``, as multipart form fields or JSON members."""

    model_config = ConfigDict(extra="forbid")

    top_k: Integer = Field(
        default=5,
        ge=1,
        le=1000,
        description="How many of the most probable classes to return (capped at the number of"
        " classes).",
        examples=[5],
    )


class ExplainParams(BaseModel):
    """Parameters of ``explain``, as multipart form fields or JSON members."""

    # 'layer' and 'layer_index' are alternatives: a request may give one of them, not both.
    # (Said without 'not', which schemathesis's coverage phase cannot combine with binary parts.)
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [{"properties": {"layer": False}}, {"properties": {"layer_index": False}}]
        },
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
