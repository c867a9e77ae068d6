"""The ``/v1`` endpoints: thin handlers over the runtime.

Uploads arrive as ``multipart/form-data`` (``curl -F image=@cat.jpg -F layer=layer4``, the field
``image`` repeatable) or as ``application/json`` (``{"images": [{"data": "<base64>"}], ...}``);
the handler picks by ``Content-Type``. Everything that can be checked without the model's work
(image count, parameters, layer and class names) is checked before anything is queued, and a
request whose client goes away has its queued work cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import typing
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.api import answers
from service.api.examples import problem_responses
from service.api.requests import (
    IMAGE_MEDIA_TYPES,
    ExplainForm,
    ExplainJsonRequest,
    ExplainParams,
    JsonRequest,
    PredictForm,
    PredictJsonRequest,
    PredictParams,
)
from service.api.responses import ExplainResponse, LayerList, ModelInfo, ModelList, PredictResponse
from service.config import Settings, get_settings
from service.engine.explain import PostProcess
from service.engine.models import LoadedModel
from service.engine.spec import ModelSpec
from service.errors import (
    InvalidImageError,
    InvalidParameterError,
    ModelNotReadyError,
    UnsupportedContentTypeError,
)
from service.runtime.jobs import ExplainJob, OutputOptions, PredictJob
from service.runtime.runtime import Runtime

T = TypeVar("T")
P = TypeVar("P", bound=BaseModel)

#: How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1


class ClientDisconnectedError(Exception):
    """The client went away while its request waited; its work was cancelled."""


# ----------------------------------------------------------------------------- dependencies


def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise ModelNotReadyError(
            "The service is not running (starting or stopping); retry shortly.",
            retry_after_s=5.0,
        )
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelName = Annotated[
    str, Path(description="Model name, as listed by GET /v1/models.", examples=["resnet50"])
]


def get_model(model: ModelName, runtime: RuntimeDep) -> LoadedModel:
    """The ready model named in the path (404 unknown, 503 not ready), before any body is read."""
    return runtime.model(model)


ModelDep = Annotated[LoadedModel, Depends(get_model)]


@dataclass
class Upload(Generic[P]):
    """The images' bytes and the validated parameters of one request."""

    blobs: list[bytes]
    params: P


def _invalid(errors: list[Any], prefix: str) -> RequestValidationError:
    return RequestValidationError(
        [{**error, "loc": (prefix, *error.get("loc", ()))} for error in errors]
    )


def _pydantic_errors(exc: ValidationError) -> list[Any]:
    return list(exc.errors(include_url=False, include_input=False, include_context=False))


def _check_count(count: int, settings: Settings) -> None:
    if count == 0:
        raise InvalidParameterError(
            "Send at least one image: the multipart field 'image' (curl -F image=@photo.jpg) or"
            " the JSON member 'images'.",
            code="missing_image",
        )
    if count > settings.max_images_per_request:
        raise InvalidParameterError(
            f"The request has {count} images; the most accepted is"
            f" {settings.max_images_per_request}. Split it into several requests.",
            code="too_many_images",
        )


def _list_fields(model: type[BaseModel]) -> set[str]:
    return {
        name
        for name, field in model.model_fields.items()
        if typing.get_origin(field.annotation) is list
    }


async def _read_multipart(request: Request, settings: Settings, params_model: type[P]) -> Upload[P]:
    async with request.form() as form:
        files = form.getlist("image")
        _check_count(len(files), settings)
        errors: list[Any] = []
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if key == "image":
                continue
            if isinstance(value, UploadFile):
                errors.append(
                    {
                        "loc": (key,),
                        "msg": "must be a plain field, not a file",
                        "type": "file_not_allowed",
                    }
                )
            else:
                fields.setdefault(key, []).append(value)
        repeatable = _list_fields(params_model)
        data: dict[str, object] = {}
        for key, values in fields.items():
            if key in repeatable:
                data[key] = values
            elif len(values) > 1:
                errors.append(
                    {"loc": (key,), "msg": "given more than once", "type": "repeated_field"}
                )
            else:
                data[key] = values[0]
        blobs: list[bytes] = []
        for position, item in enumerate(files):
            if isinstance(item, str):
                errors.append(
                    {
                        "loc": ("image", position),
                        "msg": "must be a file upload (curl -F image=@photo.jpg)",
                        "type": "not_a_file",
                    }
                )
            else:
                blobs.append(await item.read())
        try:
            params = params_model.model_validate(data)
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc))
        if errors:
            raise _invalid(errors, "form")
        return Upload(blobs, params)


def _decode_base64(data: str, index: int) -> bytes:
    text = data.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidImageError(
                "A data URL must be base64-encoded ('data:image/png;base64,...').",
                image_index=index,
            )
    try:
        return base64.b64decode(text, altchars=b"-_")
    except (binascii.Error, ValueError):
        raise InvalidImageError(
            "The image's 'data' is not valid base64; encode the file's bytes with base64.",
            image_index=index,
        ) from None


async def _read_json(
    request: Request, settings: Settings, json_model: type[JsonRequest]
) -> Upload[Any]:
    body = await request.body()
    try:
        payload = json_model.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(_pydantic_errors(exc), "body") from None
    _check_count(len(payload.images), settings)
    blobs = [_decode_base64(image.data, i) for i, image in enumerate(payload.images)]
    return Upload(blobs, payload)


async def _read_upload(
    request: Request,
    settings: Settings,
    params_model: type[P],
    json_model: type[JsonRequest],
) -> Upload[P]:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        upload = await _read_multipart(request, settings, params_model)
    elif media_type == "application/json" or media_type.endswith("+json"):
        upload = await _read_json(request, settings, json_model)
    else:
        shown = media_type or "none"
        raise UnsupportedContentTypeError(
            f"Content-Type '{shown}' is not accepted; send multipart/form-data (curl -F"
            ' image=@photo.jpg) or application/json ({"images": [{"data": "<base64>"}]}).',
            allowed=["multipart/form-data", "application/json"],
        )
    request.state.images = len(upload.blobs)
    return upload


async def read_predict(request: Request, settings: SettingsDep) -> Upload[PredictParams]:
    return await _read_upload(request, settings, PredictParams, PredictJsonRequest)


async def read_explain(request: Request, settings: SettingsDep) -> Upload[ExplainParams]:
    return await _read_upload(request, settings, ExplainParams, ExplainJsonRequest)


PredictUpload = Annotated[Upload[PredictParams], Depends(read_predict)]
ExplainUpload = Annotated[Upload[ExplainParams], Depends(read_explain)]


# ----------------------------------------------------------------------------- helpers


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and dropping its queued items) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnectedError
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(_consume)


@dataclass(frozen=True)
class ExplainPlan:
    layers: tuple[str, ...]
    targets: tuple[int, ...] | None
    post: PostProcess
    outputs: OutputOptions


def plan_explain(model: LoadedModel, params: ExplainParams) -> ExplainPlan:
    """Resolve layers and targets against the model, so that bad names fail before queueing."""
    if params.layer and params.layer_index is not None:
        raise InvalidParameterError(
            "Give 'layer' or 'layer_index', not both.", code="conflicting_parameters"
        )
    if params.layer_index is not None:
        layers: tuple[str, ...] = (model.layer(index=params.layer_index).name,)
    elif params.layer:
        layers = tuple(dict.fromkeys(model.layer(name).name for name in params.layer))
    else:
        layers = (model.default_layer,)
    targets = tuple(dict.fromkeys(model.target(value) for value in params.target)) or None
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
    return ExplainPlan(layers, targets, post, outputs)


def _model_info(runtime: Runtime, spec: ModelSpec) -> ModelInfo:
    status = runtime.statuses()[spec.name]
    if status.state == "ready":
        try:
            return answers.model_info(runtime.model(spec.name), status.replicas)
        except ModelNotReadyError:
            pass  # shutting down
    return answers.pending_model_info(spec, status)


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

router = APIRouter(prefix="/v1", tags=["models"])

_UPLOAD_ERRORS = problem_responses(400, 404, 413, 415, 422, 429, 500, 503, 504)


@router.get("/models", summary="List the served models")
async def list_models(runtime: RuntimeDep) -> ModelList:
    """Every configured model with its state; details once it is loaded."""
    return ModelList(models=[_model_info(runtime, spec) for spec in runtime.specs()])


@router.get("/models/{model}", summary="Describe a model", responses=problem_responses(404))
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
    responses=_UPLOAD_ERRORS,
    openapi_extra=_request_body(PredictForm, PredictJsonRequest),
)
async def predict(
    request: Request, runtime: RuntimeDep, model: ModelDep, upload: PredictUpload
) -> PredictResponse:
    """The top_k classes of each image, batched with other callers' images."""
    started = time.perf_counter()
    images = await until_disconnected(request, runtime.decode(upload.blobs))
    decode_s = (time.perf_counter() - started) / len(images)
    jobs = [PredictJob(image=image) for image in images]
    outcomes = await until_disconnected(request, runtime.predict(model.name, jobs))
    return answers.predict_response(model, images, outcomes, upload.params.top_k, decode_s)


@router.post(
    "/models/{model}/explain",
    summary="Explain the model's decision on images (Grad-CAM and family)",
    responses=_UPLOAD_ERRORS,
    openapi_extra=_request_body(ExplainForm, ExplainJsonRequest),
)
async def explain(
    request: Request, runtime: RuntimeDep, model: ModelDep, upload: ExplainUpload
) -> ExplainResponse:
    """One map per (target, layer) for each image: on the feature grid, optionally upsampled,
    and as an overlay on the uploaded image."""
    params = upload.params
    plan = plan_explain(model, params)
    started = time.perf_counter()
    images = await until_disconnected(request, runtime.decode(upload.blobs))
    decode_s = (time.perf_counter() - started) / len(images)
    jobs = [
        ExplainJob(
            image=image,
            layers=plan.layers,
            targets=plan.targets,
            top_k=params.top_k,
            method=params.method,
            post=plan.post,
            outputs=plan.outputs,
        )
        for image in images
    ]
    outcomes = await until_disconnected(request, runtime.explain(model.name, jobs))
    return answers.explain_response(model, images, outcomes, params, decode_s)
