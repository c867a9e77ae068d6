"""The FastAPI application: lifespan, middleware, error handlers, health and metrics endpoints.

``create_app`` is the factory the CLI serves and the tests build. Middleware is pure ASGI, from
the outside in:

1. ``ObservabilityMiddleware``: in-flight gauge, request count and latency by route template,
   and one access-log line per request (``service.access``);
2. ``UploadLimitMiddleware``: 413 before the body is read when Content-Length is too large,
   and while reading when a streamed body grows past the limit;
3. ``ProblemGuardMiddleware``: turns anything that escaped the handlers into a problem response
   (a generic 500 for the unexpected), so no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic.json_schema import models_json_schema
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.answers import model_statuses, not_ready_problem
from service.api.examples import add_schema_extras
from service.api.problems import (
    install_problem_handlers,
    problem_response,
    service_problem,
    unhandled_error_handler,
    use_problem_media_type,
)
from service.api.requests import REQUEST_SCHEMAS
from service.api.responses import Liveness, NotReadyProblem, Readiness
from service.api.routes import ClientDisconnectedError
from service.api.routes import router as v1_router
from service.config import Settings, get_settings
from service.errors import PayloadTooLargeError, ServiceError
from service.metrics import Metrics
from service.runtime.runtime import Runtime

access_logger = logging.getLogger("service.access")

DESCRIPTION = """\
Serves timm image classifiers and explains their decisions with Grad-CAM and its family
(Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, Eigen-CAM, Score-CAM).

Upload images as `multipart/form-data` (the field `image`, repeatable) or as `application/json`
(`{"images": [{"data": "<base64>"}]}`). Errors are RFC 9457 problem details
(`application/problem+json`) with a stable `code`; for a multi-image request, `image_index`
says which image (0-based) failed.
"""

TAGS = [
    {"name": "models", "description": "Models, their layers, predictions and explanations."},
    {"name": "health", "description": "Liveness and readiness probes, metrics."},
]


def _version() -> str:
    try:
        return metadata.version("gradcam-service")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


# ----------------------------------------------------------------------------- middleware


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


class UploadLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, without buffering them first."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLargeError:
        mib = self.max_bytes / (1024 * 1024)
        return PayloadTooLargeError(
            f"The request body is larger than the limit of {self.max_bytes} bytes"
            f" ({mib:.1f} MiB); send smaller or fewer images."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            response = problem_response(
                service_problem(self._error(), scope.get("path")),
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)


class ProblemGuardMiddleware:
    """Answer a problem for any exception the handlers did not, if no response has started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ServiceError as exc:
            if started:
                raise
            response: Response = problem_response(service_problem(exc, scope.get("path")))
            await response(scope, receive, send)
        except ClientDisconnectedError:
            if started:
                raise
            await Response(status_code=499)(scope, receive, send)
        except Exception as exc:
            if started:
                raise
            response = await unhandled_error_handler(Request(scope), exc)
            await response(scope, receive, send)


def _route_of(scope: Scope) -> tuple[str, str | None]:
    """(route template, model name) of a request; matched here if routing never happened."""
    route = scope.get("route")
    params: dict[str, Any] = scope.get("path_params") or {}
    if route is None:
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, child = candidate.matches(scope)
            if match == Match.FULL:
                route, params = candidate, child.get("path_params") or {}
                break
    template = getattr(route, "path", None)
    model = params.get("model")
    return (template if isinstance(template, str) else "unmatched"), (
        model if isinstance(model, str) else None
    )


def _quoted(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "/{}._-:+" for c in text):
        return text
    return json.dumps(text)


class ObservabilityMiddleware:
    """Prometheus request metrics by route template, and one access-log line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight_requests.inc()
        try:
            await self.app(scope, receive, recording_send)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                status = 499  # cancelled: the client or the server went away
            raise
        finally:
            self.metrics.in_flight_requests.dec()
            seconds = time.perf_counter() - started
            template, model = _route_of(scope)
            method = str(scope.get("method", ""))
            labels = (template, method, str(status))
            self.metrics.requests_total.labels(*labels).inc()
            self.metrics.request_duration_seconds.labels(*labels).observe(seconds)
            state = scope.get("state")
            images = state.get("images") if isinstance(state, dict) else None
            path = template if template != "unmatched" else str(scope.get("path", ""))[:200]
            access_logger.log(
                logging.WARNING if status >= 500 and status not in (503, 504) else logging.INFO,
                "method=%s path=%s status=%d duration_ms=%.1f model=%s images=%s",
                method,
                _quoted(path),
                status,
                seconds * 1000.0,
                _quoted(model) if model is not None else "-",
                images if images is not None else "-",
            )


# ----------------------------------------------------------------------------- health

health = APIRouter(tags=["health"])


@health.get("/livez", summary="Liveness: the process is serving")
async def livez() -> Liveness:
    return Liveness()


@health.get(
    "/readyz",
    summary="Readiness: every model is loaded",
    response_model=Readiness,
    responses={
        503: {
            "model": NotReadyProblem,
            "description": "Some model is still loading or failed to load.",
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before asking again.",
                    "schema": {"type": "integer"},
                }
            },
        }
    },
)
async def readyz(request: Request) -> Readiness | Response:
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, Runtime):
        return problem_response(not_ready_problem({}, request.url.path))
    models = model_statuses(runtime.statuses())
    if runtime.ready:
        return Readiness(models=models)
    return problem_response(not_ready_problem(models, request.url.path))


@health.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(content=registry.render(), media_type=CONTENT_TYPE_LATEST)


# ----------------------------------------------------------------------------- application


def _drop_default_validation_responses(schema: dict[str, Any]) -> None:
    """Remove FastAPI's generic 422 (ours are problem details, documented where they occur)."""
    default = {"$ref": "#/components/schemas/HTTPValidationError"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema") == default:
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


class GradCamAPI(FastAPI):
    """FastAPI with the upload bodies, the examples and the problem media type in its doc."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()
        _, definitions = models_json_schema(
            [(model, "validation") for model in REQUEST_SCHEMAS],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in definitions.get("$defs", {}).items():
            components.setdefault(name, definition)
        add_schema_extras(components)
        _drop_default_validation_responses(schema)
        use_problem_media_type(schema)
        self.openapi_schema = schema
        return schema


def create_app(
    settings: Settings | None = None,
    runtime: Runtime | None = None,
    *,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the application. Models start loading when it starts (its lifespan), not here.

    ``runtime``: serve this runtime instead of building one from ``settings`` (tests); the app
    still starts and stops it. ``metrics``: the registry to export (a fresh one by default).
    """
    settings = settings or get_settings()
    specs = settings.model_specs() if runtime is None else []  # config errors surface now
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = runtime or Runtime(specs, settings.runtime_config(), metrics)
        app.state.runtime = served
        await served.start()
        try:
            yield
        finally:
            await served.stop()
            app.state.runtime = None

    app = GradCamAPI(
        title="Grad-CAM service",
        version=_version(),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    app.dependency_overrides[get_settings] = lambda: settings
    install_problem_handlers(app)
    app.include_router(v1_router)
    app.include_router(health)
    # Added innermost first: the last one added wraps all the others.
    app.add_middleware(ProblemGuardMiddleware)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return app
