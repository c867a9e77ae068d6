"""Errors as RFC 9457 problem details, in one place.

Every error response of the service is an ``application/problem+json`` body shaped by
:class:`Problem`: domain errors (:class:`~service.errors.ServiceError`, mapped by their
``category`` through :data:`STATUS_BY_CATEGORY`), request validation errors, Starlette's own
HTTP errors (unknown route, wrong method, malformed multipart) and anything unexpected (a generic
500 whose traceback goes to the log, never to the caller).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ErrorCategory, InvalidParameterError, ServiceError

logger = logging.getLogger("service.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:gradcam-service:problem:"

#: The one map from error category to HTTP status.
STATUS_BY_CATEGORY: dict[ErrorCategory, int] = {
    ErrorCategory.INVALID_IMAGE: 400,
    ErrorCategory.UNSUPPORTED_MEDIA: 415,
    ErrorCategory.TOO_LARGE: 413,
    ErrorCategory.NOT_FOUND: 404,
    ErrorCategory.INVALID_ARGUMENT: 422,
    ErrorCategory.NOT_READY: 503,
    ErrorCategory.OVERLOADED: 429,
    ErrorCategory.DEADLINE: 504,
    ErrorCategory.INTERNAL: 500,
}

#: Whether a status lets the caller retry later; ``Retry-After`` is sent for these when known.
RETRYABLE = frozenset({429, 503})

INTERNAL_DETAIL = "The service failed to handle this request; it was logged. Retry, or report it."


class FieldError(BaseModel):
    """One invalid request field."""

    loc: list[str | int] = Field(
        description="Where the field is: 'body' or 'form', then the field name and position."
    )
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="Machine-readable kind of error, e.g. 'greater_than_equal'.")


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "type": "urn:gradcam-service:problem:unknown_layer",
                "title": "Unknown or unusable layer",
                "status": 422,
                "detail": "Model 'resnet50' has no usable layer 'layer5'. ...",
                "code": "unknown_layer",
                "instance": "/v1/models/resnet50/explain",
                "allowed": ["layer1", "layer2", "layer3", "layer4"],
            }
        }
    )

    type: str = Field(
        default="about:blank",
        description="URI naming the kind of problem: urn:gradcam-service:problem:<code>.",
    )
    title: str = Field(description="Short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.", ge=400, le=599)
    detail: str = Field(description="What went wrong for this request, and what to do.")
    code: str = Field(description="Stable machine-readable error code, e.g. 'unknown_layer'.")
    instance: str | None = Field(default=None, description="The request path.")
    image_index: int | None = Field(
        default=None,
        ge=0,
        description="For a multi-image request: the 0-based position of the image at fault.",
    )
    allowed: list[str] | None = Field(
        default=None, description="The accepted values, when the error is an unknown value."
    )
    retry_after_s: float | None = Field(
        default=None, description="Seconds to wait before retrying (also in Retry-After)."
    )
    errors: list[FieldError] | None = Field(
        default=None, description="For validation errors: every invalid field."
    )


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_PREFIX + code


def problem_response(
    problem: Problem,
    *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Serialise a problem, omitting absent members, with ``Retry-After`` when it applies."""
    out_headers = dict(headers or {})
    if problem.retry_after_s is not None and problem.status in RETRYABLE:
        out_headers["Retry-After"] = str(max(1, math.ceil(problem.retry_after_s)))
    return JSONResponse(
        problem.model_dump(mode="json", exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=out_headers,
    )


def service_problem(error: ServiceError, instance: str | None) -> Problem:
    """The problem for a domain error; a multi-image error names its image in the detail."""
    status = STATUS_BY_CATEGORY[error.category]
    detail = error.detail
    if error.image_index is not None and not detail.startswith(f"image {error.image_index}:"):
        detail = f"image {error.image_index}: {detail}"
    return Problem(
        type=problem_type(error.code),
        title=error.title,
        status=status,
        detail=detail,
        code=error.code,
        instance=instance,
        image_index=error.image_index,
        allowed=error.allowed,
        retry_after_s=error.retry_after_s,
    )


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    problem = service_problem(exc, request.url.path)
    if problem.status >= 500:
        logger.warning("%s %s -> %d %s", request.method, request.url.path, problem.status, exc.code)
    return problem_response(problem)


def _field_errors(raw: Iterable[Any]) -> list[FieldError]:
    """Validation errors without their input values (which may be image bytes) or contexts."""
    errors: list[FieldError] = []
    for error in raw:
        if not isinstance(error, Mapping):
            continue
        loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
        errors.append(
            FieldError(loc=loc, msg=str(error.get("msg", "")), type=str(error.get("type", "")))
        )
    return errors


def _field_name(loc: Sequence[str | int]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "form", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or "body"


def validation_problem(raw_errors: Iterable[Any], instance: str | None) -> Problem:
    """A 422 ``invalid_parameter`` problem naming every invalid field."""
    errors = _field_errors(raw_errors)
    summary = "; ".join(f"{_field_name(e.loc)}: {e.msg}" for e in errors[:10])
    if len(errors) > 10:
        summary += f"; and {len(errors) - 10} more"
    detail = f"The request has invalid parameters: {summary}." if errors else "Invalid request."
    problem = service_problem(InvalidParameterError(detail), instance)
    return problem.model_copy(update={"errors": errors})


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_problem(exc.errors(), request.url.path))


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors: unknown route, wrong method, malformed form data."""
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if status == 404:
        detail = f"There is no endpoint at {request.url.path}; see /docs for the API."
    elif status == 405:
        headers = {key.lower(): value for key, value in (exc.headers or {}).items()}
        allow = headers.get("allow", "")
        detail = f"{request.method} is not allowed here" + (f"; use {allow}." if allow else ".")
    elif isinstance(exc.detail, str) and exc.detail and exc.detail != phrase:
        detail = exc.detail
    else:
        detail = phrase + "."
    problem = Problem(
        type="about:blank",
        title=phrase,
        status=status,
        detail=detail,
        code=_HTTP_CODES.get(status, f"http_{status}"),
        instance=request.url.path,
    )
    return problem_response(problem, headers=exc.headers)


def internal_problem(instance: str | None) -> Problem:
    """The generic 500: it says nothing about the failure, which goes to the log."""
    return service_problem(ServiceError(INTERNAL_DETAIL), instance)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: log the traceback, answer a generic 500 that leaks nothing."""
    logger.error(
        "unhandled %s in %s %s",
        type(exc).__name__,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return problem_response(internal_problem(request.url.path))


def install_problem_handlers(app: FastAPI) -> None:
    """Register every error handler on ``app``."""
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)


# ------------------------------------------------------------------------- OpenAPI

_EXAMPLES: dict[int, tuple[str, dict[str, Any]]] = {
    400: (
        "The image could not be decoded",
        {
            "type": problem_type("invalid_image"),
            "title": "The image could not be decoded",
            "status": 400,
            "detail": "image 1: The uploaded data is not an image in any recognised format; send"
            " the bytes of a JPEG, PNG, BMP, TIFF, WEBP, GIF file.",
            "code": "invalid_image",
            "instance": "/v1/models/resnet50/explain",
            "image_index": 1,
        },
    ),
    404: (
        "No model with this name",
        {
            "type": problem_type("unknown_model"),
            "title": "Unknown model",
            "status": 404,
            "detail": "There is no model named 'resnet5'.",
            "code": "unknown_model",
            "instance": "/v1/models/resnet5",
            "allowed": ["resnet50"],
        },
    ),
    413: (
        "The upload, or an image's dimensions, exceed the limits",
        {
            "type": problem_type("payload_too_large"),
            "title": "The upload is too large",
            "status": 413,
            "detail": "The request body is larger than the limit of 20971520 bytes (20.0 MiB);"
            " send smaller or fewer images.",
            "code": "payload_too_large",
            "instance": "/v1/models/resnet50/predict",
        },
    ),
    415: (
        "The image format is not accepted",
        {
            "type": problem_type("unsupported_image_format"),
            "title": "The image format is not accepted",
            "status": 415,
            "detail": "image 0: Images in ICO format are not accepted; convert it to one of"
            " JPEG, PNG, BMP, TIFF, WEBP, GIF and try again.",
            "code": "unsupported_image_format",
            "instance": "/v1/models/resnet50/predict",
            "image_index": 0,
            "allowed": ["JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF"],
        },
    ),
    422: (
        "A parameter is invalid: unknown layer or class, bad value, too many images",
        {
            "type": problem_type("invalid_parameter"),
            "title": "Invalid parameter",
            "status": 422,
            "detail": "The request has invalid parameters: top_k: Input should be greater than"
            " or equal to 1.",
            "code": "invalid_parameter",
            "instance": "/v1/models/resnet50/predict",
            "errors": [
                {
                    "loc": ["form", "top_k"],
                    "msg": "Input should be greater than or equal to 1",
                    "type": "greater_than_equal",
                }
            ],
        },
    ),
    429: (
        "Too much work is queued; retry after the Retry-After delay",
        {
            "type": problem_type("overloaded"),
            "title": "The service is overloaded",
            "status": 429,
            "detail": "Model 'resnet50' has 64 images queued (limit 64); retry after 2 s.",
            "code": "overloaded",
            "instance": "/v1/models/resnet50/explain",
            "retry_after_s": 2.0,
        },
    ),
    500: (
        "An unexpected failure (logged on the server)",
        internal_problem("/v1/models/resnet50/explain").model_dump(exclude_none=True),
    ),
    503: (
        "The model is still loading, failed to load, or the service is shutting down",
        {
            "type": problem_type("model_not_ready"),
            "title": "The model is not ready",
            "status": 503,
            "detail": "Model 'resnet50' is not ready (loading).",
            "code": "model_not_ready",
            "instance": "/v1/models/resnet50/predict",
            "retry_after_s": 5.0,
        },
    ),
    504: (
        "The request did not finish within its deadline",
        {
            "type": problem_type("deadline_exceeded"),
            "title": "The request took longer than its deadline",
            "status": 504,
            "detail": "The request did not finish within 60 s; its remaining work was dropped."
            " Retry later or send fewer images.",
            "code": "deadline_exceeded",
            "instance": "/v1/models/resnet50/explain",
        },
    ),
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, with the Problem schema."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, example = _EXAMPLES[status]
        headers = (
            {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer"},
                }
            }
            if status in RETRYABLE
            else None
        )
        entry: dict[str, Any] = {
            "model": Problem,
            "description": description,
            "content": {"application/json": {"example": example}},
        }
        if headers:
            entry["headers"] = headers
        responses[status] = entry
    return responses


def use_problem_media_type(openapi: dict[str, Any]) -> dict[str, Any]:
    """Move error responses' ``application/json`` content to ``application/problem+json``.

    FastAPI documents extra responses under the route's media type; ours are problem details.
    """
    for path_item in openapi.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                if not str(status).isdigit() or int(status) < 400:
                    continue
                content = response.get("content", {})
                if "application/json" in content:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
    return openapi
