"""The deployment files: valid for their consumers (Kubernetes, KubeRay, Ray Serve), and saying
what the service needs (probes, a GPU, the application's import path, settings it knows).

Kubernetes manifests are checked with ``check-jsonschema`` against the strict schemas kept in
``deploy/schemas`` (see its README); Serve configs with Ray's own ``ServeDeploySchema``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
KUBERNETES = DEPLOY / "kubernetes"
SERVE_CONFIG = DEPLOY / "ray" / "serve.yaml"
CHECK_JSONSCHEMA = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
IMPORT_PATH = "service.ray_serve.deployment:build"

SCHEMA_OF_KIND = {
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscaler-autoscaling-v2.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("ray.io/v1", "RayService"): "rayservice-ray-v1.json",
}
MANIFESTS = sorted(KUBERNETES.rglob("*.yaml"))

needs_check_jsonschema = pytest.mark.skipif(
    CHECK_JSONSCHEMA is None, reason="check-jsonschema is not installed (the dev extra)"
)


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), path
    return document


def _schema_for(path: Path) -> Path:
    document = _load(path)
    return SCHEMAS / SCHEMA_OF_KIND[(document["apiVersion"], document["kind"])]


def _check_jsonschema(schema: Path, instance: Path) -> subprocess.CompletedProcess[str]:
    assert CHECK_JSONSCHEMA is not None
    return subprocess.run(
        [CHECK_JSONSCHEMA, "--schemafile", str(schema), str(instance)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _manifest(kind: str) -> dict[str, Any]:
    (document,) = [d for d in map(_load, MANIFESTS) if d["kind"] == kind]
    return document


def _serve_config_of_rayservice() -> dict[str, Any]:
    config = yaml.safe_load(_manifest("RayService")["spec"]["serveConfigV2"])
    assert isinstance(config, dict)
    return config


def test_every_kind_of_manifest_has_a_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in map(_load, MANIFESTS)}
    assert kinds == set(SCHEMA_OF_KIND)


@needs_check_jsonschema
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_manifest_matches_its_schema(manifest: Path) -> None:
    result = _check_jsonschema(_schema_for(manifest), manifest)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_check_jsonschema
@pytest.mark.parametrize(
    ("manifest", "typo"),
    [
        ("server/deployment.yaml", ("readinessProbe:", "readinesProbe:")),
        ("rayservice.yaml", ("serveConfigV2:", "serveConfig:")),
        ("rayservice.yaml", ("rayStartParams: {}", "rayStartParam: {}")),
    ],
)
def test_a_misspelt_field_fails_validation(
    tmp_path: Path, manifest: str, typo: tuple[str, str]
) -> None:
    source = KUBERNETES / manifest
    text = source.read_text(encoding="utf-8")
    assert typo[0] in text
    broken = tmp_path / source.name
    broken.write_text(text.replace(typo[0], typo[1], 1), encoding="utf-8")
    result = _check_jsonschema(_schema_for(source), broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert typo[1].rstrip(": {}") in result.stdout


def test_the_server_deployment_requests_a_gpu_and_probes_livez_and_readyz() -> None:
    deployment = _manifest("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["GRADCAM_HOST"] == "0.0.0.0"
    settings = Settings.model_validate(
        {name.removeprefix("GRADCAM_").lower(): value for name, value in env.items()}
    )
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.graceful_shutdown_s, "SIGKILL must not cut the graceful shutdown"


def test_the_service_and_the_autoscaler_point_at_the_deployment() -> None:
    deployment = _manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _manifest("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    target = _manifest("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_the_rayservice_has_a_head_and_a_gpu_worker_group_probed_on_readyz() -> None:
    cluster = _manifest("RayService")["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no model on the head"
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    (application,) = _serve_config_of_rayservice()["applications"]
    assert application["args"]["ray_gpus_per_replica"] == 1
    assert group["maxReplicas"] >= application["args"]["ray_max_replicas"]


@pytest.mark.parametrize("source", ["deploy/ray/serve.yaml", "RayService serveConfigV2"])
def test_serve_configs_are_valid_for_ray_serve_and_name_the_application(source: str) -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed")
    config = _load(SERVE_CONFIG) if source.endswith(".yaml") else _serve_config_of_rayservice()
    schema.ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == IMPORT_PATH
    assert application["route_prefix"] == "/"
    assert "deployments" not in application, "replicas come from the settings in args"
    assert set(application["args"]) <= set(Settings.model_fields)
    Settings.model_validate(application["args"])


def test_the_local_serve_config_listens_on_loopback() -> None:
    assert _load(SERVE_CONFIG)["http_options"]["host"] == "127.0.0.1"
