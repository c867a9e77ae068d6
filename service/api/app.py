"""The FastAPI application factory: routers, error handlers, middleware and the OpenAPI doc.

``create_app`` is what the CLI serves and the tests build. Models start loading when the app
starts (its lifespan). Middleware (:mod:`service.api.middleware`) wraps, from the outside in:
security headers, observability, CORS, API keys, the upload size limit, and the problem
guard. The page at ``/`` and its assets come from :mod:`service.api.routes.page`. With API keys
configured every route needs one but those declared :func:`~service.api.auth.public` (the
probes, the page, the API documentation).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from service.api import openapi
from service.api.auth import AuthMiddleware, KeyRing, access_summary, public
from service.api.middleware import (
    CorsMiddleware,
    ObservabilityMiddleware,
    ProblemGuardMiddleware,
    SecurityHeadersMiddleware,
    UploadLimitMiddleware,
)
from service.api.problems import install_problem_handlers
from service.api.routes import docs, health, models, page
from service.metrics import Metrics
from service.runtime.runtime import Runtime
from service.settings import Settings, get_settings

logger = logging.getLogger("service")

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


def default_replica_name() -> str:
    """What ``X-Gradcam-Replica`` says outside Ray Serve: this host (a pod's name on
    Kubernetes) and process."""
    return f"{socket.gethostname()}/{os.getpid()}"


def _documentation_is_public(app: FastAPI) -> None:
    """Declare FastAPI's own routes, the OpenAPI document and its viewers (``/docs``, its OAuth2
    redirect, ``/redoc``), :func:`~service.api.auth.public`, wherever the app serves them."""
    served = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url}
    for route in app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute) and route.path in served:
            public(route.endpoint)


def _operation_id(route: APIRoute) -> str:
    """Clean operation ids for generated clients: the handler's name (``explain``)."""
    return route.name


class GradCamAPI(FastAPI):
    """FastAPI whose OpenAPI document is completed by :mod:`service.api.openapi`: generic until
    every model is loaded, then naming the models' layers and classes."""

    def openapi(self) -> dict[str, Any]:
        generic = self.openapi_schema
        if generic is None:
            generic = openapi.complete(
                super().openapi(), self.state.settings, self.state.keys, self.routes
            )
        runtime = getattr(self.state, "runtime", None)
        if not isinstance(runtime, Runtime) or not runtime.ready:
            return generic
        if self._served_document is None:
            models = [runtime.model(spec.name) for spec in runtime.specs()]
            self._served_document = openapi.with_models(generic, models)
        return self._served_document

    _served_document: dict[str, Any] | None = None


def create_app(
    settings: Settings | None = None,
    runtime: Runtime | None = None,
    *,
    metrics: Metrics | None = None,
    replica: str | None = None,
) -> FastAPI:
    """Build the application. Models start loading when it starts (its lifespan), not here.

    ``runtime``: serve this runtime instead of building one from ``settings`` (a Ray Serve
    replica, tests); the app still starts and stops it. ``metrics``: the registry to export (a
    fresh one by default). ``replica``: the name model answers carry in ``X-Gradcam-Replica``
    (default: host and process id).
    """
    settings = settings or get_settings()
    specs = settings.model_specs() if runtime is None else []  # config errors surface now
    keys = KeyRing.from_settings(settings)
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.log(*access_summary(keys, settings.host))
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
        # /docs and /redoc with their assets from the package (service.api.routes.docs), not
        # FastAPI's, which load them from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.keys = keys
    app.state.metrics = metrics
    app.state.runtime = None
    app.state.replica = replica or default_replica_name()

    _documentation_is_public(app)
    install_problem_handlers(app)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(page.router)
    app.include_router(docs.router)
    # Added innermost first: the last one added wraps all the others.
    app.add_middleware(ProblemGuardMiddleware)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(AuthMiddleware, keys=keys, router=app.router)
    app.add_middleware(CorsMiddleware, origins=settings.cors_origins)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, label_callers=keys.enabled)
    app.add_middleware(SecurityHeadersMiddleware)
    return app
