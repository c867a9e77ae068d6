"""Write the JSON schemas that ``tests/deploy`` validates the Kubernetes manifests against.

kubeconform and kubectl's validation need the network or a cluster; ``check-jsonschema`` needs
only a schema file. This script makes self-contained ones, kept in ``deploy/schemas/``:

- Kubernetes' own (Deployment, Service, HorizontalPodAutoscaler) from the ``kubernetes-validate``
  wheel's ``v<version>-local-strict`` folder (``additionalProperties: false`` throughout),
  bundled with just the definitions they reference;
- KubeRay's RayService: the ``ray.io/v1`` ``openAPIV3Schema`` of its CRD
  (``ray-operator/config/crd/bases/ray.io_rayservices.yaml``), with ``additionalProperties:
  false`` added to every object that lists its properties, so that a misspelt field fails.

Usage (pip download --no-deps kubernetes-validate; a KubeRay checkout):

    python tools/vendor_schemas.py \
        --kubernetes-validate kubernetes_validate-1.37.0-py3-none-any.whl \
        --rayservice-crd kuberay/ray-operator/config/crd/bases/ray.io_rayservices.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "deploy" / "schemas"
KUBERNETES_VERSION = "v1.37.0"
KUBERNETES_KINDS = (
    "deployment-apps-v1",
    "service-v1",
    "horizontalpodautoscaler-autoscaling-v2",
    "configmap-v1",
)
_REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and (match := _REF.match(value)):
                found.add(match.group(1))
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def _local_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                _REF.sub(r"#/$defs/\1", value)
                if key == "$ref" and isinstance(value, str)
                else _local_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_local_refs(value) for value in node]
    return node


def bundle_kubernetes(wheel: Path, kind: str) -> dict[str, Any]:
    """``kind``'s strict schema with every definition it reaches, refs made local."""
    folder = f"kubernetes_validate/kubernetes-json-schema/{KUBERNETES_VERSION}-local-strict"
    with zipfile.ZipFile(wheel) as archive:
        schema = json.loads(archive.read(f"{folder}/{kind}.json"))
        definitions = json.loads(archive.read(f"{folder}/_definitions.json"))["$defs"]
    needed: set[str] = set()
    pending = _refs(schema)
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending |= _refs(definitions[name])
    schema = _local_refs(schema)
    schema["$defs"] = {name: _local_refs(definitions[name]) for name in sorted(needed)}
    schema["$comment"] = (
        f"Kubernetes {KUBERNETES_VERSION} ({kind}), from the kubernetes-validate wheel's"
        " local-strict schemas; written by tools/vendor_schemas.py."
    )
    return schema


def _closed(node: Any) -> Any:
    """Every object schema with ``properties`` refuses other members, unless it says otherwise."""
    if isinstance(node, dict):
        node = {key: _closed(value) for key, value in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_closed(value) for value in node]
    return node


def rayservice_schema(crd_file: Path) -> dict[str, Any]:
    crd = yaml.safe_load(crd_file.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _closed(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": "RayService"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "spec"})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["$comment"] = (
        "KubeRay's RayService CRD (ray.io/v1 openAPIV3Schema) with additionalProperties: false"
        " on every object that lists its properties; written by tools/vendor_schemas.py."
    )
    return schema


def _write(name: str, schema: dict[str, Any]) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.json"
    path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-validate", type=Path, required=True, help="its wheel")
    parser.add_argument("--rayservice-crd", type=Path, required=True, help="its CRD's YAML")
    args = parser.parse_args()
    for kind in KUBERNETES_KINDS:
        _write(kind, bundle_kubernetes(args.kubernetes_validate, kind))
    _write("rayservice-ray-v1", rayservice_schema(args.rayservice_crd))


if __name__ == "__main__":
    main()
