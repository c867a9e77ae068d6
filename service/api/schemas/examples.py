"""OpenAPI examples: of the request and response bodies, and of each error status's problem.

Problem examples are built from the service's errors (:mod:`service.errors`,
:mod:`service.api.errors`) the way the service builds its real answers, so their titles, codes
and statuses cannot drift from what clients get. The app attaches :data:`SCHEMA_EXTRAS` to the
components of its OpenAPI document; routes take their error responses from
:func:`problem_responses`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.api.answers import not_ready_problem
from service.api.errors import UnauthorizedError
from service.api.middleware import upload_too_large
from service.api.problems import (
    RETRYABLE,
    Problem,
    internal_problem,
    service_problem,
    validation_problem,
)
from service.api.schemas.requests import EXAMPLE_PNG_BASE64, ExplainJsonRequest, PredictJsonRequest
from service.api.schemas.responses import (
    ExplainResponse,
    LayerList,
    ModelInfo,
    ModelStatusSchema,
    NotReadyProblem,
    PredictResponse,
    Readiness,
)
from service.engine.imaging.images import UPLOAD_FORMATS
from service.errors import (
    DeadlineExceededError,
    InvalidImageError,
    ModelNotReadyError,
    OverloadedError,
    ServiceError,
    UnknownLayerError,
    UnknownModelError,
    UnsupportedImageFormatError,
)

_PREDICT = "/v1/models/resnet50/predict"
_EXPLAIN = "/v1/models/resnet50/explain"
_FORMATS = ", ".join(UPLOAD_FORMATS)


def _dumped(problem: Problem) -> dict[str, Any]:
    return problem.model_dump(mode="json", exclude_none=True)


def _problem(error: ServiceError, instance: str) -> dict[str, Any]:
    return _dumped(service_problem(error, instance))


# ============================================================================ bodies

_TIMINGS = {"decode_ms": 3.1, "preprocess_ms": 2.4, "queue_ms": 4.9}
_ORIGINAL = {"width": 640, "height": 480, "mode": "RGB", "format": "JPEG"}
_TABBY = {"index": 281, "label": "tabby, tabby cat", "probability": 0.62}

_MODEL_INFO = {
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

_LAYER_LIST = {
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


def _answer(**result: Any) -> dict[str, Any]:
    """A predict or explain answer for one image."""
    return {
        "model": "resnet50",
        "random_weights": False,
        "warnings": [],
        "results": [{"index": 0, "original": _ORIGINAL, **result}],
    }


def _map(data: list[list[float]]) -> dict[str, Any]:
    return {"shape": [2, 2], "dtype": "float32", "encoding": "list", "data": data}


_PREDICT_RESPONSE = _answer(
    predictions=[_TABBY, {"index": 285, "label": "Egyptian cat", "probability": 0.21}],
    timings={**_TIMINGS, "compute_ms": 18.0, "render_ms": 0.0, "batch_size": 2},
)
_EXPLAIN_RESPONSE = _answer(
    # resnet50's 224x224 centre crop (crop_pct 0.95) of the 640x480 upload
    input_box={"left": 89.97, "top": 12.26, "right": 547.99, "bottom": 469.79},
    predictions=[_TABBY],
    explanations=[
        {
            "target": {**_TABBY, "logit": 11.3},
            "layer": "layer4",
            "method": "gradcam",
            "heatmap": _map([[0.0, 0.25], [0.5, 1.0]]),
            "raw_heatmap": _map([[0.0, 0.6], [1.2, 2.4]]),
            "raw_range": {"min": -0.8, "max": 2.4},
            "overlay": {
                "media_type": "image/png",
                "width": 640,
                "height": 480,
                "data": "iVBORw0KGgo...",
            },
        }
    ],
    timings={**_TIMINGS, "compute_ms": 21.5, "render_ms": 9.8, "batch_size": 1},
)

_UNKNOWN_LAYER = UnknownLayerError(
    "Model 'resnet50' has no usable layer 'layer5'. ...",
    allowed=["layer1", "layer2", "layer3", "layer4"],
)

#: Members added to each body's schema in the OpenAPI document.
SCHEMA_EXTRAS: dict[type[BaseModel], dict[str, Any]] = {
    PredictJsonRequest: {"examples": [{"images": [{"data": EXAMPLE_PNG_BASE64}], "top_k": 3}]},
    ExplainJsonRequest: {
        "examples": [
            {
                "images": [{"data": EXAMPLE_PNG_BASE64}],
                "layer": ["layer4"],
                "target": ["tabby"],
                "method": "gradcam",
                "overlay": "png",
                "encoding": "base64",
            }
        ]
    },
    ModelInfo: {"example": _MODEL_INFO},
    LayerList: {"example": _LAYER_LIST},
    PredictResponse: {"example": _PREDICT_RESPONSE},
    ExplainResponse: {"example": _EXPLAIN_RESPONSE},
    Readiness: {
        "example": {"status": "ready", "models": {"resnet50": {"state": "ready", "replicas": 1}}}
    },
    NotReadyProblem: {
        "example": _dumped(
            not_ready_problem({"resnet50": ModelStatusSchema(state="loading")}, "/readyz")
        )
    },
    Problem: {"example": _problem(_UNKNOWN_LAYER, _EXPLAIN)},
}

# ============================================================================ problems

#: For each error status: the response's description, and an example problem.
PROBLEM_EXAMPLES: dict[int, tuple[str, dict[str, Any]]] = {
    400: (
        "The image could not be decoded",
        _problem(
            InvalidImageError(
                "The uploaded data is not an image in any recognised format; send the bytes of a"
                f" {_FORMATS} file.",
                image_index=1,
            ),
            _EXPLAIN,
        ),
    ),
    401: (
        "An API key is needed (the deployment configures keys) and none, or a wrong one, was sent",
        _problem(
            UnauthorizedError(
                "This endpoint needs an API key: send 'Authorization: Bearer <key>' or"
                " 'X-API-Key: <key>'.",
                code="missing_api_key",
            ),
            _EXPLAIN,
        ),
    ),
    404: (
        "No model with this name",
        _problem(
            UnknownModelError("There is no model named 'resnet5'.", allowed=["resnet50"]),
            "/v1/models/resnet5",
        ),
    ),
    413: (
        "The upload, or an image's dimensions, exceed the limits",
        _problem(upload_too_large(20 * 1024 * 1024), _PREDICT),
    ),
    415: (
        "The image format is not accepted",
        _problem(
            UnsupportedImageFormatError(
                f"Images in ICO format are not accepted; convert it to one of {_FORMATS} and"
                " try again.",
                image_index=0,
                allowed=list(UPLOAD_FORMATS),
            ),
            _PREDICT,
        ),
    ),
    422: (
        "A parameter is invalid: unknown layer or class, bad value, too many images",
        _dumped(
            validation_problem(
                [
                    {
                        "loc": ("form", "top_k"),
                        "msg": "Input should be greater than or equal to 1",
                        "type": "greater_than_equal",
                    }
                ],
                _PREDICT,
            )
        ),
    ),
    429: (
        "Too much work is queued; retry after the Retry-After delay",
        _problem(
            OverloadedError(
                "Model 'resnet50' has 64 images queued (limit 64); retry after 2 s.",
                retry_after_s=2.0,
            ),
            _EXPLAIN,
        ),
    ),
    500: ("An unexpected failure (logged on the server)", _dumped(internal_problem(_EXPLAIN))),
    503: (
        "The model is still loading, failed to load, or the service is shutting down",
        _problem(
            ModelNotReadyError("Model 'resnet50' is not ready (loading)."),
            _PREDICT,
        ),
    ),
    504: (
        "The request did not finish within its deadline",
        _problem(
            DeadlineExceededError(
                "The request did not finish within 60 s; its remaining work was dropped."
                " Retry later or send fewer images."
            ),
            _EXPLAIN,
        ),
    ),
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, with the Problem schema."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, example = PROBLEM_EXAMPLES[status]
        entry: dict[str, Any] = {
            "model": Problem,
            "description": description,
            "content": {"application/json": {"example": example}},
        }
        if status == 401:
            entry["headers"] = {
                "WWW-Authenticate": {
                    "description": "The scheme to authenticate with: Bearer.",
                    "schema": {"type": "string"},
                }
            }
        if status in RETRYABLE:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer"},
                }
            }
        responses[status] = entry
    return responses


def add_schema_extras(components: dict[str, Any]) -> None:
    """Attach :data:`SCHEMA_EXTRAS` to the OpenAPI document's component schemas."""
    for model, extra in SCHEMA_EXTRAS.items():
        components[model.__name__].update(extra)
