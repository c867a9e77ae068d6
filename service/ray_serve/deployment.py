"""The service as a Ray Serve deployment: one replica = one runtime with its models, behind the
service's own FastAPI app (``@serve.ingress``), so the API, its errors and its OpenAPI document
are the single process's.

A replica loads its models before it reports itself started, so Serve routes requests only to
replicas whose models are resident, and a model that fails to load fails the replica (and, after
a few tries, the deployment) with the loading error instead of serving 503s.

Serve config files name :func:`build` (``import_path: service.ray_serve.deployment:build``);
``gradcam-service ray`` calls :func:`application`.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from service.api.app import create_app
from service.errors import ModelLoadError
from service.logs import configure_logging
from service.metrics import Metrics
from service.ray_serve.options import DEPLOYMENT_NAME, deployment_options
from service.runtime.runtime import Runtime
from service.settings import Settings

logger = logging.getLogger("service.ray_serve")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class GradCamReplica:
    """One replica: a runtime with its models, and the service's app around it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._runtime: Runtime | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Load the models, then build the app (Serve calls this once, after ``__init__``)."""
        settings = self._settings
        configure_logging(settings.log_level)
        metrics = Metrics()
        runtime = Runtime(settings.model_specs(), settings.runtime_config(), metrics)
        await runtime.start()
        if not await runtime.wait_ready():
            failed = {
                name: status.error or status.state for name, status in runtime.statuses().items()
            }
            await runtime.stop()
            raise ModelLoadError(f"This replica's models did not load: {failed}")
        self._runtime = runtime
        context = serve.get_replica_context()
        replica = f"{context.deployment}#{context.replica_tag}"  # GradCam#<id>, as Serve logs it
        logger.info("replica %s ready with models %s", replica, ", ".join(runtime.statuses()))
        return create_app(settings, runtime, metrics=metrics, replica=replica)

    async def check_health(self) -> None:
        """Serve's periodic health check: unhealthy once the runtime no longer serves."""
        if self._runtime is None or not self._runtime.ready:
            raise ModelLoadError("The replica's runtime is not serving.")


def application(settings: Settings, *, cluster_has_gpus: bool) -> Application:
    """The Serve application for ``settings`` (models file read here, so that every replica
    gets the same models wherever it runs)."""
    settings = settings.with_models_inline()
    options = deployment_options(settings, cluster_has_gpus=cluster_has_gpus)
    return GradCamReplica.options(**options).bind(settings)  # type: ignore[attr-defined,no-any-return]


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster has GPUs now (nodes it may still add do not count)."""
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return resources.get("GPU", 0) > 0


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder for config files: ``args`` are settings by field name
    (``max_batch_size``, ``ray_max_replicas``, ...) over the ``GRADCAM_*`` variables of the
    environment the application is built in (its ``runtime_env``). An unknown name is refused
    (the environment's unknown ``GRADCAM_*`` variables are ignored, a config file's typo not)."""
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(
            f"Unknown settings in the application's args: {', '.join(unknown)}. They are the"
            " service's settings by field name, e.g. max_batch_size, ray_max_replicas."
        )
    return application(Settings(**args), cluster_has_gpus=cluster_has_gpus())
