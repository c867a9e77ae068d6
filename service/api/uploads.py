"""Reading an upload: the images' bytes and the request's parameters, multipart or JSON.

Uploads arrive as ``multipart/form-data`` (``curl -F image=@cat.jpg -F layer=layer4``, the field
``image`` repeatable) or as ``application/json`` (``{"images": [{"data": "<base64>"}], ...}``);
the reader picks by ``Content-Type``. The image count is checked before any image is read.
"""

from __future__ import annotations

import base64
import binascii
import typing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.api.errors import UnsupportedContentTypeError
from service.api.schemas.requests import FORM_CONTEXT, JsonRequest
from service.errors import InvalidImageError, InvalidParameterError
from service.settings import Settings

P = TypeVar("P", bound=BaseModel)


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


def _nullable_fields(model: type[BaseModel]) -> set[str]:
    return {
        name
        for name, field in model.model_fields.items()
        if type(None) in typing.get_args(field.annotation)
    }


#: How a form field says "no value" where the JSON form would say null.
_FORM_NULLS = frozenset({"", "null"})


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
        nullable = _nullable_fields(params_model)
        data: dict[str, object] = {}
        for key, values in fields.items():
            if key in repeatable:
                data[key] = values
            elif len(values) > 1:
                errors.append(
                    {"loc": (key,), "msg": "given more than once", "type": "repeated_field"}
                )
            elif key in nullable and values[0].strip() in _FORM_NULLS:
                data[key] = None
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
            params = params_model.model_validate(data, context={FORM_CONTEXT: True})
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
        # Strict: the schema says what JSON types each member takes (no 0 for false, "3" for 3).
        payload = json_model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise _invalid(_pydantic_errors(exc), "body") from None
    _check_count(len(payload.images), settings)
    blobs = [_decode_base64(image.data, i) for i, image in enumerate(payload.images)]
    return Upload(blobs, payload)


async def read_upload(
    request: Request,
    settings: Settings,
    params_model: type[P],
    json_model: type[JsonRequest],
) -> Upload[P]:
    """The upload of ``request``, by its Content-Type; 415 for anything but multipart or JSON."""
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
