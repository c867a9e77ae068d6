"""Liveness and readiness probes (:func:`~service.api.auth.public`: a probe carries no key), and
the Prometheus metrics (which need a key when keys are configured, like every route)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.answers import model_statuses, not_ready_problem
from service.api.auth import public
from service.api.problems import problem_response
from service.api.schemas.examples import problem_responses
from service.api.schemas.responses import Liveness, NotReadyProblem, Readiness
from service.metrics import Metrics
from service.runtime.runtime import Runtime

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness: the process is serving")
@public
async def livez() -> Liveness:
    return Liveness()


@router.get(
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
@public
async def readyz(request: Request) -> Readiness | Response:
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, Runtime):
        return problem_response(not_ready_problem({}, request.url.path))
    models = model_statuses(runtime.statuses())
    if runtime.ready:
        return Readiness(models=models)
    return problem_response(not_ready_problem(models, request.url.path))


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **problem_responses(401),
    },
)
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(content=registry.render(), media_type=CONTENT_TYPE_LATEST)
