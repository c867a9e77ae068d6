"""Request bodies of the HTTP API: parameters, multipart forms, JSON bodies, and their limits.

Uploads arrive as ``multipart/form-data`` (:class:`PredictForm`, :class:`ExplainForm`) or as
``application/json`` (:class:`PredictJsonRequest`, :class:`ExplainJsonRequest`); both carry the
same parameters (:class:`PredictParams`, :class:`ExplainParams`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.responses import Encoding
from service.engine.images import ACCEPTED_FORMATS
from service.engine.methods import METHOD_NAMES, METHODS
from service.engine.render import COLORMAPS, DEFAULT_COLORMAP
from service.runtime.jobs import OverlayKind, UpsampledSize

#: Cost bounds of one explain request, per image.
MAX_LAYERS = 8
MAX_TARGETS = 16
MAX_EXPLAIN_TOP_K = 10

#: Media types an uploaded image may declare.
IMAGE_MEDIA_TYPES = tuple(f"image/{fmt.lower()}" for fmt in ACCEPTED_FORMATS)

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
