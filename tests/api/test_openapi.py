"""The committed OpenAPI document is the app's, and it documents what clients need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.cli import main, render_openapi

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
EXPORT = "gradcam-service export-openapi"
UPLOADS = ("/v1/models/{model}/predict", "/v1/models/{model}/explain")
ERRORS = ("400", "404", "413", "415", "422", "429", "503", "504")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(render_openapi())
    return doc


def test_committed_openapi_matches_the_app(client: TestClient) -> None:
    assert COMMITTED.is_file(), f"openapi/openapi.json is missing; run `{EXPORT}`"
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    live = json.loads(json.dumps(client.app.openapi()))  # type: ignore[attr-defined]
    assert committed == live, f"openapi/openapi.json is out of date; run `{EXPORT}`"
    assert COMMITTED.read_text(encoding="utf-8") == render_openapi(), f"run `{EXPORT}`"


def test_export_command_writes_the_document(tmp_path: Path) -> None:
    output = tmp_path / "out" / "openapi.json"
    assert main(["export-openapi", "--output", str(output)]) == 0
    assert output.read_text(encoding="utf-8") == render_openapi()


def test_uploads_accept_multipart_and_json(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for path in UPLOADS:
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        content = body["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        for media in content.values():
            name = media["schema"]["$ref"].rsplit("/", 1)[1]
            assert name in schemas
        form = schemas[content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
        assert form["properties"]["image"]["items"]["format"] == "binary"
        json_body = schemas[content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
        assert "images" in json_body["properties"]
        assert json_body["examples"]


def test_every_error_response_is_a_problem_with_an_example(document: dict[str, Any]) -> None:
    for path in UPLOADS:
        responses = document["paths"][path]["post"]["responses"]
        for status in ERRORS:
            assert status in responses, (path, status)
            content = responses[status]["content"]
            assert list(content) == ["application/problem+json"], (path, status)
            problem = content["application/problem+json"]
            assert problem["schema"] == {"$ref": "#/components/schemas/Problem"}
            assert problem["example"]["status"] == int(status)
        assert "Retry-After" in responses["429"]["headers"]
        assert "Retry-After" in responses["503"]["headers"]


def test_enums_are_documented(document: dict[str, Any]) -> None:
    from service.engine.methods import METHOD_NAMES
    from service.engine.render import COLORMAPS

    properties = document["components"]["schemas"]["ExplainForm"]["properties"]
    assert properties["method"]["enum"] == list(METHOD_NAMES)
    assert properties["colormap"]["enum"] == list(COLORMAPS)
    assert properties["overlay"]["enum"] == ["none", "png", "jpeg", "webp", "panel", "dicom"]
    assert properties["encoding"]["enum"] == ["list", "base64"]
    assert properties["upsampled"]["enum"] == ["none", "input", "original"]
    for name, prop in properties.items():
        assert prop.get("description"), f"ExplainForm.{name} has no description"


def test_responses_have_examples(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("PredictResponse", "ExplainResponse", "ModelInfo", "LayerList", "Problem"):
        assert "example" in schemas[name], name
