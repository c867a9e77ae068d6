"""The OpenAPI document: FastAPI's, completed with what it cannot know by itself.

- the upload request bodies (multipart and JSON), the examples, and problem+json error bodies;
- the limits this deployment enforces (images per request) and its API-key security;
- once every model is loaded, what each parameter may name: the models, their layers, layer
  indices and classes. A schema-valid request is then never refused for a reason the document
  could have said. With several models the names are the union over them; which one a model
  accepts is in ``GET /v1/models/{model}`` and ``/layers``.

The committed ``openapi/openapi.json`` is the generic document (default settings, no model).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute

from service.api.auth import KeyRing, is_public, reachable_routes
from service.api.problems import use_problem_media_type
from service.api.schemas.examples import add_schema_extras
from service.api.schemas.requests import REQUEST_SCHEMAS
from service.engine.models.loaded import LoadedModel
from service.settings import Settings

#: Component schemas whose ``image``/``images`` list is bounded by the request image limit.
_IMAGE_LISTS = {
    "PredictForm": "image",
    "ExplainForm": "image",
    "PredictJsonRequest": "images",
    "ExplainJsonRequest": "images",
}
_EXPLAIN_BODIES = ("ExplainForm", "ExplainJsonRequest")
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key as a bearer token: 'Authorization: Bearer <key>'.",
    },
    "apiKeyAuth": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same API key in the X-API-Key header.",
    },
}


def complete(
    schema: dict[str, Any], settings: Settings, keys: KeyRing, routes: Sequence[BaseRoute]
) -> dict[str, Any]:
    """Complete FastAPI's generated document of ``routes`` in place (no model needed)."""
    _, definitions = models_json_schema(
        [(model, "validation") for model in REQUEST_SCHEMAS],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, definition in definitions.get("$defs", {}).items():
        schemas.setdefault(name, definition)
    add_schema_extras(schemas)
    for name, member in _IMAGE_LISTS.items():
        schemas[name]["properties"][member]["maxItems"] = settings.max_images_per_request
    _drop_default_validation_responses(schema)
    use_problem_media_type(schema)
    _add_security(schema, keys, routes)
    return schema


def with_models(schema: dict[str, Any], models: list[LoadedModel]) -> dict[str, Any]:
    """A copy of ``schema`` that names the served models, their layers and classes."""
    document = copy.deepcopy(schema)
    names = [model.name for model in models]
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "model":
                    parameter["schema"]["enum"] = names
    layers = sorted({layer.name for model in models for layer in model.layers})
    indices = sorted(
        {i.layer_index for model in models for i in model.layers if i.layer_index is not None}
    )
    labels = sorted({name for model in models for name in model.label_names()})
    most_classes = max(model.num_classes for model in models)
    schemas = document["components"]["schemas"]
    target = {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": most_classes - 1},
            {"type": "string", "enum": labels},
        ]
    }
    for body in _EXPLAIN_BODIES:
        properties = schemas[body]["properties"]
        _set_item_schema(properties["layer"], {"type": "string", "enum": layers})
        _set_item_schema(properties["target"], target)
        properties["layer_index"]["anyOf"][0]["enum"] = indices
    return document


def _set_item_schema(one_or_many: dict[str, Any], item: dict[str, Any]) -> None:
    """Set the item schema of a parameter that takes an array of items or one item."""
    array, single = one_or_many["anyOf"]
    array["items"] = copy.deepcopy(item)
    single.clear()
    single.update(copy.deepcopy(item))


def _add_security(schema: dict[str, Any], keys: KeyRing, routes: Sequence[BaseRoute]) -> None:
    """Declare the API-key schemes on every operation but the public ones (as the middleware
    does: deny by default); optional when keys are off."""
    schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    requirement: list[dict[str, list[str]]] = [{name: []} for name in SECURITY_SCHEMES]
    if not keys.enabled:
        requirement.append({})  # the deployment runs open
    open_operations = {
        (route.path_format, method.lower())
        for route in reachable_routes(routes)
        if is_public(route)
        for method in getattr(route, "methods", None) or ()
    }
    for path, path_item in schema.get("paths", {}).items():
        for method, operation in path_item.items():
            if (path, method) not in open_operations:
                operation["security"] = requirement


def _drop_default_validation_responses(schema: dict[str, Any]) -> None:
    """Remove FastAPI's generic 422 (ours are problem details, documented where they occur)."""
    default = {"$ref": "#/components/schemas/HTTPValidationError"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema") == default:
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
