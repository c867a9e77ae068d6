"""The committed OpenAPI document is the app's, and it documents what clients need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.openapi import with_models
from service.cli import main
from service.commands.export_openapi import render_openapi

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
    # The served document is the committed one with this deployment's image limit and the
    # names of the loaded models' layers and classes.
    state = client.app.state  # type: ignore[attr-defined]
    schemas = committed["components"]["schemas"]
    for body in ("PredictForm", "ExplainForm", "PredictJsonRequest", "ExplainJsonRequest"):
        member = "image" if body.endswith("Form") else "images"
        schemas[body]["properties"][member]["maxItems"] = state.settings.max_images_per_request
    models = [state.runtime.model(spec.name) for spec in state.runtime.specs()]
    live = json.loads(json.dumps(client.app.openapi()))  # type: ignore[attr-defined]
    assert with_models(committed, models) == live, f"openapi.json is out of date; run `{EXPORT}`"
    assert COMMITTED.read_text(encoding="utf-8") == render_openapi(), f"run `{EXPORT}`"


def test_served_document_names_the_models_layers_and_classes(client: TestClient) -> None:
    live = client.get("/openapi.json").json()
    explain = live["paths"]["/v1/models/{model}/explain"]["post"]
    (model,) = [p for p in explain["parameters"] if p["name"] == "model"]
    assert model["schema"]["enum"] == ["tiny", "vit"]
    form = live["components"]["schemas"]["ExplainForm"]["properties"]
    many, one = form["layer"]["anyOf"]  # a list of layers, or one
    assert {"layer4", "blocks.1.norm1"} <= set(many["items"]["enum"])
    assert one["enum"] == many["items"]["enum"]
    assert 2 in form["layer_index"]["anyOf"][0]["enum"]
    many, one = form["target"]["anyOf"]
    assert one == many["items"]
    by_type = {item["type"]: item for item in one["anyOf"]}
    assert by_type["integer"]["maximum"] == 3  # tiny has 4 classes, vit 3
    assert {"cat", "dog", "bird", "fish"} <= set(by_type["string"]["enum"])


def test_the_image_count_limit_and_the_exclusive_layer_choice_are_in_the_schema(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["ExplainForm"]["properties"]["image"]["maxItems"] == 16
    assert schemas["PredictJsonRequest"]["properties"]["images"]["maxItems"] == 16
    assert {
        "anyOf": [
            {"properties": {"layer": False}},
            {"properties": {"layer_index": {"type": "null"}}},
        ]
    } in schemas["ExplainJsonRequest"]["allOf"]


def test_protected_operations_declare_the_api_key_schemes(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert schemes["apiKeyAuth"] == {**schemes["apiKeyAuth"], "in": "header", "name": "X-API-Key"}
    for path, item in document["paths"].items():
        for operation in item.values():
            protected = path.startswith("/v1/") or path == "/metrics"
            assert ("security" in operation) == protected, path
            if protected:
                assert "401" in operation["responses"], path


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
    from service.engine.cam.methods import METHOD_NAMES
    from service.engine.pictures.overlays import COLORMAPS

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
