"""The FastAPI application factory: routers, error handlers, middleware and the OpenAPI doc.

``create_app`` is what the CLI serves and the tests build. Models start loading when the app
starts (its lifespan). Middleware (:mod:`service.api.middleware`) wraps, from the outside in:
observability, the upload size limit, and the problem guard.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from service.api.examples import add_schema_extras
from service.api.middleware import (
    ObservabilityMiddleware,
    ProblemGuardMiddleware,
    UploadLimitMiddleware,
)
from service.api.problems import install_problem_handlers, use_problem_media_type
from service.api.requests import REQUEST_SCHEMAS
from service.api.routes import health, models
from service.config import Settings, get_settings
from service.metrics import Metrics
from service.runtime.runtime import Runtime

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


def _operation_id(route: APIRoute) -> str:
    """Clean operation ids for generated clients: the handler's name (``explain``)."""
    return route.name


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
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    app.dependency_overrides[get_settings] = lambda: settings
    install_problem_handlers(app)
    app.include_router(models.router)
    app.include_router(health.router)
    # Added innermost first: the last one added wraps all the others.
    app.add_middleware(ProblemGuardMiddleware)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return app
