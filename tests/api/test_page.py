"""The page at ``/`` and its assets as HTTP resources: headers, references, the options the
page reads. What the page does is tested in a browser (``test_page_in_browser.py``)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import resources

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.routes.page import CONTENT_SECURITY_POLICY
from service.api.schemas.requests import ExplainParams
from service.engine.cam.methods import METHOD_NAMES
from service.engine.pictures._colormaps import LUTS
from service.engine.pictures.overlays import COLORMAPS, DEFAULT_COLORMAP

STATIC = resources.files("service.api") / "static"


class _References(HTMLParser):
    """Every URL the page's markup names, and what would run or style it inline."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        self.inline += [f"{tag} {k}" for k, _ in attrs if k == "style" or k.startswith("on")]
        if tag == "script" and not values.get("src"):
            self.inline.append("script without src")
        self._in_style = tag == "style"

    def handle_data(self, data: str) -> None:
        if self._in_style and data.strip():
            self.inline.append("style element")


def _references() -> _References:
    parser = _References()
    parser.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    return parser


def _module_imports() -> list[str]:
    """The ES modules the page's scripts import (``from "./api.js"``), as /ui/ URLs."""
    found = []
    for entry in STATIC.iterdir():
        if entry.name.endswith(".js"):
            text = entry.read_text(encoding="utf-8")
            found += ["/ui/" + name for name in re.findall(r'from "\./([^"]+)"', text)]
    return found


def test_the_page_is_served_at_the_root_with_a_strict_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["connect-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert 'data-testid="upload"' in response.text


def test_the_file_picker_offers_images_and_dicom_files() -> None:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    (accept,) = re.findall(r'data-testid="upload"[^>]*accept="([^"]+)"', html, flags=re.S)
    assert {"image/*", ".tif", ".tiff", ".dcm", "application/dicom"} <= set(accept.split(","))


def test_the_page_has_no_inline_code_and_names_only_its_own_assets() -> None:
    references = _references()
    assert references.inline == []
    assert set(references.urls) >= {"/ui/app.js", "/ui/style.css", "/ui/icon.svg"}
    assert [u for u in references.urls if not u.startswith("/ui/") and u != "/docs"] == []


def test_every_asset_the_page_names_is_served_with_its_media_type(client: TestClient) -> None:
    media = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    urls = {u for u in _references().urls if u.startswith("/ui/")} | set(_module_imports())
    assert "/ui/render.js" in urls
    for url in sorted(urls):
        response = client.get(url)
        assert response.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert response.headers["content-type"].startswith(media[suffix]), url
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_an_unchanged_asset_is_answered_304_from_its_etag(client: TestClient) -> None:
    first = client.get("/ui/app.js")
    again = client.get("/ui/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    changed = client.get("/ui/app.js", headers={"If-None-Match": '"stale"'})
    assert changed.status_code == 200


@pytest.mark.parametrize("path", ["/ui/absent.js", "/ui/index.html", "/ui/..%2Fapp.py"])
def test_anything_else_under_ui_is_a_404_problem(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_the_page_and_its_assets_are_not_api_operations(client: TestClient) -> None:
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    assert [p for p in paths if p == "/" or p.startswith("/ui")] == []


def test_the_page_options_carry_the_servers_own_colour_tables(client: TestClient) -> None:
    options = client.get("/ui/options.json").json()
    assert list(options["colormaps"]) == list(COLORMAPS)
    for name, hex_table in options["colormaps"].items():
        table = np.frombuffer(bytes.fromhex(hex_table), dtype=np.uint8).reshape(256, 3)
        assert np.array_equal(table, LUTS[name]), name
    assert options["default_colormap"] == DEFAULT_COLORMAP
    assert [m["name"] for m in options["methods"]] == list(METHOD_NAMES)
    assert all(m["description"] for m in options["methods"])
    assert options["default_alpha"] == ExplainParams().alpha
