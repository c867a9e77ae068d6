"""The ``/v1`` endpoints: models, their layers, predictions and explanations.

Thin handlers: the request's parameters become the engine's plan, :mod:`service.serving.operations`
does the work, :mod:`service.api.answers` writes the answer. Everything that can be checked
without the model's work (image count, parameters, layer and class names) is checked before
anything is queued, and a request whose client goes away has its queued work cancelled.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from service.api import answers
from service.api.deps import (
    AdmittedModelDep,
    CallerDep,
    ExplainUpload,
    ModelDep,
    ModelName,
    PredictUpload,
    RuntimeDep,
    SettingsDep,
)
from service.api.disconnects import until_disconnected
from service.api.schemas.examples import problem_responses
from service.api.schemas.requests import (
    IMAGE_MEDIA_TYPES,
    ExplainForm,
    ExplainJsonRequest,
    ExplainParams,
    PredictForm,
    PredictJsonRequest,
)
from service.api.schemas.responses import (
    ExplainResponse,
    LayerList,
    ModelInfo,
    ModelList,
    PredictResponse,
)
from service.engine import plan
from service.engine.models.loaded import LoadedModel
from service.engine.models.spec import ModelSpec
from service.engine.plan import ExplainPlan
from service.errors import ModelNotReadyError, ServiceError, UnknownLayerError, UnknownTargetError
from service.runtime.runtime import Runtime
from service.serving import operations

T = TypeVar("T")

# ----------------------------------------------------------------------------- helpers


def _with_hint(error: UnknownLayerError | UnknownTargetError, model: str) -> ServiceError:
    """The engine's error, plus the endpoint that lists the accepted values (the engine names
    no HTTP paths). An ambiguous label already says what to do: it is returned as is."""
    if isinstance(error, UnknownLayerError):
        hint = f"GET /v1/models/{model}/layers lists them all."
    elif error.code == UnknownTargetError.code:
        hint = f"Use a class index or a label from GET /v1/models/{model}."
    else:
        return error
    return type(error)(
        f"{error.detail} {hint}",
        code=error.code,
        image_index=error.image_index,
        allowed=error.allowed,
        retry_after_s=error.retry_after_s,
    )


def plan_explain(model: LoadedModel, params: ExplainParams) -> ExplainPlan:
    """The engine's plan of ``params``; an unknown layer or class says where to list them."""
    try:
        return plan.plan_explain(model, params.parameters())
    except (UnknownLayerError, UnknownTargetError) as exc:
        raise _with_hint(exc, model.name) from None


def _model_info(runtime: Runtime, spec: ModelSpec) -> ModelInfo:
    status = runtime.statuses()[spec.name]
    if status.state == "ready":
        try:
            return answers.model_info(
                runtime.model(spec.name), status.replicas, runtime.work(spec.name)
            )
        except ModelNotReadyError:
            pass  # shutting down
    return answers.pending_model_info(spec, status)


def _watch(request: Request) -> operations.Watch:
    """Work for ``request``, cancelled (its queued items dropped) if the client goes away."""

    def watch(work: Awaitable[T]) -> Awaitable[T]:
        return until_disconnected(request, work)

    return watch


def _request_body(form: type[BaseModel], json_body: type[BaseModel]) -> dict[str, Any]:
    """The requestBody of an upload endpoint: multipart or JSON (schemas added by the app)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"$ref": f"#/components/schemas/{form.__name__}"},
                    "encoding": {"image": {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}},
                },
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{json_body.__name__}"}
                },
            },
        }
    }


# ----------------------------------------------------------------------------- endpoints

router = APIRouter(prefix="/v1", tags=["models"], responses=problem_responses(401))

_UPLOAD_ERRORS = problem_responses(400, 404, 413, 415, 422, 429, 500, 503, 504)

#: Names the replica that computed a model answer: how a client (and the scale-out test) sees
#: which process of a scaled deployment did the work.
REPLICA_HEADER = "X-Gradcam-Replica"
_MODEL_ANSWER = {
    200: {
        "headers": {
            REPLICA_HEADER: {
                "description": "The replica that computed this answer: on Ray Serve its replica id"
                " (GradCam#<id>), else the host and process id (<host>/<pid>).",
                "schema": {"type": "string"},
            }
        }
    },
    **_UPLOAD_ERRORS,
}


def _name_replica(request: Request, response: Response) -> None:
    response.headers[REPLICA_HEADER] = request.app.state.replica


@router.get("/models", summary="List the served models", responses=problem_responses(503))
async def list_models(runtime: RuntimeDep) -> ModelList:
    """Every configured model with its state; details once it is loaded."""
    return ModelList(models=[_model_info(runtime, spec) for spec in runtime.specs()])


@router.get("/models/{model}", summary="Describe a model", responses=problem_responses(404, 503))
async def describe_model(model: ModelName, runtime: RuntimeDep) -> ModelInfo:
    """Classes, preprocessing, default layer, device and weights (random ones are flagged)."""
    try:
        return answers.model_info(
            runtime.model(model), runtime.statuses()[model].replicas, runtime.work(model)
        )
    except ModelNotReadyError:
        spec = next(spec for spec in runtime.specs() if spec.name == model)
        return _model_info(runtime, spec)


@router.get(
    "/models/{model}/layers",
    summary="List the layers a CAM can use",
    responses=problem_responses(404, 503),
)
async def list_layers(model: ModelDep) -> LayerList:
    """Every spatial layer of the model in forward order, with its feature grid."""
    return answers.layer_list(model)


@router.post(
    "/models/{model}/predict",
    summary="Classify images",
    responses=_MODEL_ANSWER,
    openapi_extra=_request_body(PredictForm, PredictJsonRequest),
)
async def predict(
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    model: AdmittedModelDep,
    upload: PredictUpload,
    caller: CallerDep,
) -> PredictResponse:
    """The top_k classes of each image, batched with other callers' images."""
    done = await operations.predict(
        runtime, model, upload.blobs, upload.params.display(), caller, _watch(request)
    )
    _name_replica(request, response)
    return answers.predict_response(
        model, done.images, done.outcomes, upload.params.top_k, done.decode_s
    )


@router.post(
    "/models/{model}/explain",
    summary="Explain the model's decision on images (Grad-CAM and family)",
    responses=_MODEL_ANSWER,
    openapi_extra=_request_body(ExplainForm, ExplainJsonRequest),
)
async def explain(
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    model: AdmittedModelDep,
    upload: ExplainUpload,
    caller: CallerDep,
    settings: SettingsDep,
) -> ExplainResponse:
    """One map per (target, layer) for each image: on the feature grid, optionally upsampled,
    and as an overlay on the uploaded image."""
    params = upload.params
    done = await operations.explain(
        runtime,
        model,
        upload.blobs,
        params.display(),
        plan_explain(model, params),
        params.outputs(),
        params.encoding,
        operations.AnswerLimits(settings.max_upsampled_side, settings.max_response_bytes),
        caller,
        _watch(request),
    )
    _name_replica(request, response)
    return answers.explain_response(model, done.images, done.outcomes, params, done.decode_s)
