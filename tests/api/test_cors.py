"""Cross-origin access (CORS) for the origins in GRADCAM_CORS_ORIGINS, and only for them.

In a real browser: ``test_page_in_browser.py`` (a page on another origin calls the API)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app

ALLOWED = "https://frontend.example.org"
OTHER = "https://elsewhere.example.org"
EXPLAIN = "/v1/models/tiny/explain"


@pytest.fixture(scope="module")
def cors_client(settings_factory: Callable[..., Any], tiny_spec: Any) -> Iterator[TestClient]:
    settings = settings_factory(models=[tiny_spec], cors_origins=[ALLOWED + "/"])
    with TestClient(create_app(settings)) as client:
        yield client


def _preflight(client: TestClient, origin: str, headers: str = "authorization") -> Any:
    return client.options(
        EXPLAIN,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )


def test_a_preflight_from_an_allowed_origin_is_accepted(cors_client: TestClient) -> None:
    response = _preflight(cors_client, ALLOWED, "authorization, x-api-key, content-type")
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert {"authorization", "x-api-key", "content-type"} <= {
        h.strip() for h in allowed_headers.split(",")
    }
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize(
    ("origin", "headers", "refused"),
    [(OTHER, "authorization", "origin"), (ALLOWED, "x-custom", "headers")],
)
def test_other_preflights_are_refused_as_problems(
    cors_client: TestClient, origin: str, headers: str, refused: str
) -> None:
    response = _preflight(cors_client, origin, headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert f"({refused} not allowed)" in response.json()["detail"]
    assert "GRADCAM_CORS_ORIGINS" in response.json()["detail"]
    assert "access-control-allow-origin" not in response.headers


def test_answers_let_an_allowed_origin_read_retry_after_and_www_authenticate(
    cors_client: TestClient,
) -> None:
    response = cors_client.get("/v1/models/absent", headers={"Origin": ALLOWED})
    assert response.status_code == 404
    assert response.headers["access-control-allow-origin"] == ALLOWED
    exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"Retry-After", "WWW-Authenticate"} <= exposed
    assert "Origin" in response.headers["vary"]
    assert "access-control-allow-credentials" not in response.headers


def test_an_upload_refused_before_the_app_still_reaches_an_allowed_origin(
    cors_client: TestClient,
) -> None:
    """CORS wraps the upload limit: a browser on the allowed origin can read the 413."""
    response = cors_client.post(
        EXPLAIN, content=b"x", headers={"Origin": ALLOWED, "Content-Length": str(10**9)}
    )
    assert response.status_code == 413
    assert response.headers["access-control-allow-origin"] == ALLOWED


def test_answers_to_another_origin_allow_nothing(cors_client: TestClient) -> None:
    response = cors_client.get("/v1/models", headers={"Origin": OTHER})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_by_default_no_origin_is_allowed(client: TestClient) -> None:
    assert _preflight(client, ALLOWED).status_code == 400
    response = client.get("/v1/models", headers={"Origin": ALLOWED})
    assert "access-control-allow-origin" not in response.headers
