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
from pydantic import BaseModel, Field
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
    ErrorCategory.UNAUTHENTICATED: 401,
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


def http_problem(status: int, detail: str, instance: str | None) -> Problem:
    """A problem for an HTTP-level error that no domain error stands for (unknown route, wrong
    method, a refused CORS preflight): the status's phrase as title, a generic code."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return Problem(
        type="about:blank",
        title=phrase,
        status=status,
        detail=detail,
        code=_HTTP_CODES.get(status, f"http_{status}"),
        instance=instance,
    )


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
    return problem_response(http_problem(status, detail, request.url.path), headers=exc.headers)


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
