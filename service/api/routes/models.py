"""The ``/v1`` endpoints: models, their layers, predictions and explanations.

Thin handlers over the runtime. Everything that can be checked without the model's work (image
count, parameters, layer and class names) is checked before anything is queued, and a request
whose client goes away has its queued work cancelled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from service.api import answers
from service.api.budget import check_explain_size
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
    DisplayParams,
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
from service.engine.cam.explain import MAX_PROBABILITY_TARGETS, PostProcess
from service.engine.faithfulness.scores import ScoreOptions
from service.engine.imaging.images import DecodedImage
from service.engine.models.loaded import LoadedModel
from service.engine.models.spec import ModelSpec
from service.errors import (
    InvalidParameterError,
    ModelNotReadyError,
    ServiceError,
    UnknownLayerError,
    UnknownTargetError,
)
from service.runtime.jobs import ExplainJob, OutputOptions, PredictJob
from service.runtime.runtime import Runtime

# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class ExplainPlan:
    layers: tuple[str, ...]  # empty: the model's default layer
    targets: tuple[int, ...] | None
    post: PostProcess
    outputs: OutputOptions
    scores: ScoreOptions | None


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


def _class_index(model: LoadedModel, value: int | str) -> int:
    """A class given as a number (digits in a form field arrive as one) or as a label."""
    return model.target(value) if isinstance(value, int) else model.label_target(value)


def plan_explain(model: LoadedModel, params: ExplainParams) -> ExplainPlan:
    """Resolve layers and targets against the model, so that bad names fail before queueing.

    No layer named: no layer in the plan, and the engine explains the model's default layer.
    """
    if "layer" in params.model_fields_set and params.layer_index is not None:
        raise InvalidParameterError(
            "Give 'layer' or 'layer_index', not both.", code="conflicting_parameters"
        )
    if params.min_probability is not None and {"target", "top_k"} & params.model_fields_set:
        raise InvalidParameterError(
            "Give one way of choosing the classes: 'target', 'top_k' or 'min_probability'.",
            code="conflicting_parameters",
        )
    try:
        if params.layer_index is not None:
            layers: tuple[str, ...] = (model.layer(index=params.layer_index).name,)
        else:
            layers = tuple(dict.fromkeys(model.layer(name).name for name in params.layer))
        targets = tuple(dict.fromkeys(_class_index(model, v) for v in params.target)) or None
    except (UnknownLayerError, UnknownTargetError) as exc:
        raise _with_hint(exc, model.name) from None
    post = (
        PostProcess(mode="threshold", threshold=params.threshold)
        if params.threshold is not None
        else PostProcess()
    )
    outputs = OutputOptions(
        heatmap=params.heatmap,
        upsampled=params.upsampled,
        overlay=params.overlay,
        colormap=params.colormap,
        alpha=params.alpha,
    )
    scores = None
    if params.scores:
        scores = ScoreOptions(
            names=tuple(dict.fromkeys(params.scores)),
            road_percentiles=tuple(params.road_percentiles),
            curve_step=params.curve_step,
        )
    return ExplainPlan(layers, targets, post, outputs, scores)


def _most_targets(model: LoadedModel, params: ExplainParams, plan: ExplainPlan) -> int:
    """The most classes one image of the request can be explained for."""
    if plan.targets:
        return len(plan.targets)
    if params.min_probability is not None:
        return min(MAX_PROBABILITY_TARGETS, model.num_classes)
    return min(params.top_k, model.num_classes)


def _model_info(runtime: Runtime, spec: ModelSpec) -> ModelInfo:
    status = runtime.statuses()[spec.name]
    if status.state == "ready":
        try:
            return answers.model_info(runtime.model(spec.name), status.replicas)
        except ModelNotReadyError:
            pass  # shutting down
    return answers.pending_model_info(spec, status)


async def _decode(
    request: Request,
    runtime: Runtime,
    model: LoadedModel,
    blobs: list[bytes],
    params: DisplayParams,
    overlay: bool = False,
) -> tuple[list[DecodedImage], float]:
    """The uploaded images, decoded off the event loop, and the decode time per image."""
    started = time.perf_counter()
    decoding = runtime.decode(blobs, params.display(), model=model.name, overlay=overlay)
    images = await until_disconnected(request, decoding)
    return images, (time.perf_counter() - started) / len(images)


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
        return answers.model_info(runtime.model(model), runtime.statuses()[model].replicas)
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
    runtime.check_admission(model.name, len(upload.blobs), caller)
    images, decode_s = await _decode(request, runtime, model, upload.blobs, upload.params)
    jobs = [PredictJob(image=image) for image in images]
    outcomes = await until_disconnected(request, runtime.predict(model.name, jobs, caller))
    _name_replica(request, response)
    return answers.predict_response(model, images, outcomes, upload.params.top_k, decode_s)


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
    plan = plan_explain(model, params)
    runtime.check_admission(model.name, len(upload.blobs), caller)
    overlay = params.overlay != "none"
    images, decode_s = await _decode(request, runtime, model, upload.blobs, params, overlay)
    check_explain_size(
        model,
        params,
        plan.layers,
        _most_targets(model, params, plan),
        images,
        max_upsampled_side=settings.max_upsampled_side,
        limit=settings.max_response_bytes,
    )
    jobs = [
        ExplainJob(
            image=image,
            layers=plan.layers,
            targets=plan.targets,
            top_k=params.top_k,
            min_probability=params.min_probability,
            method=params.method,
            post=plan.post,
            outputs=plan.outputs,
            scores=plan.scores,
        )
        for image in images
    ]
    outcomes = await until_disconnected(request, runtime.explain(model.name, jobs, caller))
    _name_replica(request, response)
    return answers.explain_response(model, images, outcomes, params, decode_s)
