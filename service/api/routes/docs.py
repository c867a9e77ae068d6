"""The API documentation, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with their scripts,
styles and icon served from the installed packages: they work offline and behind a firewall,
as the page at ``/`` does. FastAPI's own viewers load them from a CDN (a blank page offline).

The assets are the ones ``fastapi-offline`` packages (Swagger UI's bundle and CSS, ReDoc's
standalone script); the HTML is FastAPI's own (:func:`fastapi.openapi.docs.get_swagger_ui_html`
and :func:`~fastapi.openapi.docs.get_redoc_html`) pointed at them. The routes are not API
operations, hold no data and are :func:`~service.api.auth.public`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from typing import Final

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.auth import public
from service.api.routes.page import Asset, read_assets, send_asset

DOCS_PATH: Final = "/docs"
REDOC_PATH: Final = "/redoc"
OAUTH2_REDIRECT_PATH: Final = "/docs/oauth2-redirect"
ASSETS_PATH: Final = "/docs/assets"
_MEDIA_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}


@cache
def doc_assets() -> dict[str, Asset]:
    """The viewers' files by name, read once from the installed ``fastapi_offline`` package."""
    return read_assets(resources.files("fastapi_offline") / "static", _MEDIA_TYPES)


_INLINE_SCRIPT: Final = re.compile(r"<script>(.*?)</script>", re.S)


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    """A Content-Security-Policy that keeps the viewers on this origin: scripts from here and
    the page's own inline start-up script (by its hash), images, fonts, the document and
    "Try it out" calls from here only. ReDoc's sidebar links a logo on its CDN; the policy
    keeps the browser from fetching it. Inline styles stay allowed: both viewers set them."""
    body = bytes(page.body).decode("utf-8")
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode("utf-8")).digest()).decode() + "'"
        for m in _INLINE_SCRIPT.findall(body)
    )
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src 'self' {hashes}".rstrip(),
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "font-src 'self' data:",
            "connect-src 'self'",
            "worker-src 'self' blob:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    page.headers["Content-Security-Policy"] = policy
    return page


def _prefix(request: Request) -> str:
    """The path the app is mounted under (a proxy's or Ray Serve's route prefix), as FastAPI's
    own documentation routes prefix the OpenAPI document's URL."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _openapi_url(request: Request) -> str:
    return _prefix(request) + (request.app.openapi_url or "/openapi.json")


router = APIRouter(include_in_schema=False)


@router.get(DOCS_PATH)
@public
async def swagger_ui(request: Request) -> HTMLResponse:
    prefix = _prefix(request)
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - API documentation",
        swagger_js_url=f"{prefix}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{prefix}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{prefix}{ASSETS_PATH}/favicon.png",
        oauth2_redirect_url=prefix + OAUTH2_REDIRECT_PATH,
    )
    return _with_policy(page)


@router.get(OAUTH2_REDIRECT_PATH)
@public
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return _with_policy(get_swagger_ui_oauth2_redirect_html())


@router.get(REDOC_PATH)
@public
async def redoc(request: Request) -> HTMLResponse:
    prefix = _prefix(request)
    page = get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - API documentation",
        redoc_js_url=f"{prefix}{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{prefix}{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    )
    return _with_policy(page)


@router.get(ASSETS_PATH + "/{name}")
@public
async def doc_asset(request: Request, name: str) -> Response:
    found = doc_assets().get(name)
    if found is None:
        raise StarletteHTTPException(404)
    return send_asset(request, found, {"Cache-Control": "no-cache"})
