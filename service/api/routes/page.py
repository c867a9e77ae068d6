"""The page at ``/``: a browser front end to the API, served from the package.

Plain HTML, CSS and JavaScript modules in ``service/api/static`` (no build step, nothing from
another host), sent with a strict Content-Security-Policy. What the page must know of the
service, the colour maps above all, it reads from ``/ui/options.json``, built here from the
engine's own tables so that its re-rendered overlays look like the server's. None of these
routes is an API operation: they are left out of the OpenAPI document. They hold no data and
are :func:`~service.api.auth.public`: the page asks for a key when the API answers 401.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.auth import public
from service.api.schemas.requests import ExplainParams
from service.engine.cam.methods import METHOD_NAMES, METHODS
from service.engine.pictures._colormaps import LUTS
from service.engine.pictures.overlays import COLORMAPS, DEFAULT_COLORMAP

#: The page's scripts, styles and icon come from this origin only; it calls no other host and
#: runs no inline script. Images are drawn on canvases from fetched bytes (no img-src needed
#: beyond the icon).
CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
#: With the headers every answer has (nosniff, no referrer: the security headers middleware);
#: the files may be cached, provided they are revalidated (their ETag).
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def read_assets(folder: Traversable, media_types: Mapping[str, str]) -> dict[str, Asset]:
    """The files of ``folder`` (a package's resources) whose suffix ``media_types`` names, by
    name, each with its media type and an ETag from its contents."""
    found: dict[str, Asset] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in media_types:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            found[entry.name] = Asset(body, media_types[suffix], etag)
    return found


@cache
def assets() -> dict[str, Asset]:
    """Every file of ``service/api/static`` by name, read once from the installed package."""
    return read_assets(resources.files("service.api") / "static", _MEDIA_TYPES)


def page_options() -> dict[str, Any]:
    """What the page needs to know of the service to offer its choices and redraw overlays."""
    return {
        "methods": [
            {"name": name, "description": METHODS[name].description} for name in METHOD_NAMES
        ],
        "colormaps": {name: LUTS[name].tobytes().hex() for name in COLORMAPS},
        "default_colormap": DEFAULT_COLORMAP,
        "default_alpha": ExplainParams.model_fields["alpha"].default,
    }


def send_asset(
    request: Request, asset: Asset, headers: Mapping[str, str] = PAGE_HEADERS
) -> Response:
    """The file, or 304 when the browser's copy (``If-None-Match``) is current."""
    sent = {**headers, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=sent)
    return Response(asset.body, media_type=asset.media_type, headers=sent)


router = APIRouter(include_in_schema=False)


@router.get("/")
@public
async def page(request: Request) -> Response:
    return send_asset(request, assets()["index.html"])


@router.get("/ui/options.json")
@public
async def options() -> JSONResponse:
    return JSONResponse(page_options(), headers=PAGE_HEADERS)


@router.get("/ui/{name}")
@public
async def asset(request: Request, name: str) -> Response:
    found = assets().get(name)
    if found is None or name == "index.html":
        raise StarletteHTTPException(404)
    return send_asset(request, found)
