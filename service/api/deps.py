"""Every dependency the endpoints declare, as ``Annotated`` types.

They are all ``async``: FastAPI runs a plain ``def`` dependency in a worker thread, a hop that
costs more than these lookups on a machine whose cores the model is using.

The model dependency resolves before any body is read, so an unknown or loading model is
answered (404, 503) without reading the upload.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from service.api.schemas.requests import (
    ExplainJsonRequest,
    ExplainParams,
    PredictJsonRequest,
    PredictParams,
)
from service.api.uploads import Upload, read_upload
from service.engine.models.loaded import LoadedModel
from service.errors import ModelNotReadyError
from service.runtime.runtime import Runtime
from service.settings import Settings


async def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise ModelNotReadyError(
            "The service is not running (starting or stopping); retry shortly."
        )
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with (not a dependency override: FastAPI rebuilds an
    overridden dependency's signature on every request)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ModelName = Annotated[
    str, Path(description="Model name, as listed by GET /v1/models.", examples=["resnet50"])
]


async def get_model(model: ModelName, runtime: RuntimeDep) -> LoadedModel:
    """The ready model named in the path (404 unknown, 503 not ready), before any body is read."""
    return runtime.model(model)


ModelDep = Annotated[LoadedModel, Depends(get_model)]


async def get_caller(request: Request) -> str | None:
    """Who asks: the id the auth middleware gave the request (an API key's, or the address's)."""
    caller = getattr(request.state, "caller", None)
    return caller if isinstance(caller, str) else None


CallerDep = Annotated[str | None, Depends(get_caller)]


async def get_admitted_model(
    model: ModelDep, runtime: RuntimeDep, caller: CallerDep
) -> LoadedModel:
    """The model, once its queue would take at least one more image from this caller: an
    overloaded service refuses (429) before reading the upload, which under overload is most
    of a refused request's cost. The full request is checked again once its images are known."""
    runtime.check_admission(model.name, 1, caller)
    return model


#: The model of an upload endpoint: declare it before the upload, so it is resolved first.
AdmittedModelDep = Annotated[LoadedModel, Depends(get_admitted_model)]


async def read_predict(request: Request, settings: SettingsDep) -> Upload[PredictParams]:
    return await read_upload(request, settings, PredictParams, PredictJsonRequest)


async def read_explain(request: Request, settings: SettingsDep) -> Upload[ExplainParams]:
    return await read_upload(request, settings, ExplainParams, ExplainJsonRequest)


PredictUpload = Annotated[Upload[PredictParams], Depends(read_predict)]
ExplainUpload = Annotated[Upload[ExplainParams], Depends(read_explain)]
