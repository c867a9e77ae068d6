"""/docs and /redoc come with their scripts and styles from the package, not from a CDN."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.api.conftest import SettingsFactory


def _references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""", html)


def _urls(html: str) -> list[str]:
    return [a or b for a, b in _references(html)]


def test_swagger_ui_refers_only_to_this_service(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    urls = _urls(response.text)
    assert "/docs/assets/swagger-ui-bundle.js" in urls
    assert "/docs/assets/swagger-ui.css" in urls
    assert "/openapi.json" in response.text
    assert [url for url in urls if "://" in url or url.startswith("//")] == []


def test_redoc_refers_only_to_this_service(client: TestClient) -> None:
    response = client.get("/redoc")
    assert response.status_code == 200
    urls = _urls(response.text)
    assert "/docs/assets/redoc.standalone.js" in urls
    assert "fonts.googleapis.com" not in response.text
    assert [url for url in urls if "://" in url or url.startswith("//")] == []


def test_the_viewers_assets_are_served_with_their_types_and_revalidated(
    client: TestClient,
) -> None:
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in script.content
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert b"Redoc" in client.get("/docs/assets/redoc.standalone.js").content
    again = client.get(
        "/docs/assets/swagger-ui.css", headers={"If-None-Match": script.headers["etag"]}
    )
    assert again.status_code == 200  # another file's tag
    cached = client.get(
        "/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": script.headers["etag"]}
    )
    assert cached.status_code == 304


def test_an_unknown_asset_is_a_404(client: TestClient) -> None:
    assert client.get("/docs/assets/nothing.js").status_code == 404


def test_behind_a_path_prefix_the_viewers_load_their_assets_under_it(
    settings_factory: SettingsFactory,
) -> None:
    app = create_app(settings_factory())
    with TestClient(app, root_path="/gradcam") as prefixed:
        html = prefixed.get("/docs").text
    assert "/gradcam/docs/assets/swagger-ui-bundle.js" in _urls(html)
    assert "'/gradcam/openapi.json'" in html


def test_the_viewers_come_with_a_policy_that_keeps_them_on_this_origin(client: TestClient) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        policy = client.get(path).headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["connect-src"] == "'self'"
        assert directives["img-src"] == "'self' data:"
        assert "unsafe-inline" not in directives["script-src"]
        assert "http" not in policy
    # The Swagger UI start-up script is inline: allowed by its hash, nothing else inline is.
    assert "'sha256-" in client.get("/docs").headers["content-security-policy"]
