"""What Ray Serve is told, from the settings: replicas or autoscaling bounds, a request cap per
replica that lets batches fill and leaves overload to the replica's own admission, resources.
These need no Ray cluster."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import ValidationError

from service.ray_serve.options import deployment_options
from service.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GRADCAM_"):
            monkeypatch.delenv(name)


def _options(cluster_has_gpus: bool = False, **settings: Any) -> dict[str, Any]:
    return deployment_options(Settings(**settings), cluster_has_gpus=cluster_has_gpus)


def test_a_fixed_number_of_replicas_without_autoscaling() -> None:
    options = _options(ray_replicas=3)
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options


def test_max_replicas_turns_autoscaling_on_with_two_batches_per_replica_as_target() -> None:
    options = _options(ray_max_replicas=6, max_batch_size=16)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 32.0,
    }
    bounded = _options(ray_min_replicas=2, ray_max_replicas=4, ray_target_ongoing_requests=5)
    assert bounded["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 5.0,
    }


def test_a_replica_takes_every_request_its_queue_admits_so_batches_fill() -> None:
    options = _options(max_queue_size=64, max_batch_size=8)
    assert options["max_ongoing_requests"] == 64 + 8
    assert options["max_ongoing_requests"] > 5, "Serve's default of 5 would cap batches"
    # Overload is the replica's 429 problem: Serve queues, it does not refuse.
    assert options["max_queued_requests"] == -1
    assert _options(ray_max_ongoing_requests=12)["max_ongoing_requests"] == 12


def test_a_request_cap_below_the_batch_size_is_refused() -> None:
    with pytest.raises(ValidationError, match="fill a batch"):
        Settings(ray_max_ongoing_requests=4, max_batch_size=8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ray_min_replicas": 2}, "set GRADCAM_RAY_MAX_REPLICAS too"),
        ({"ray_min_replicas": 3, "ray_max_replicas": 2}, "below GRADCAM_RAY_MIN_REPLICAS"),
        ({"ray_replicas": 0}, "greater than or equal to 1"),
    ],
)
def test_inconsistent_replica_bounds_are_refused(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**settings)


def test_one_gpu_per_replica_where_the_cluster_has_gpus_unless_set() -> None:
    assert _options(cluster_has_gpus=True)["ray_actor_options"]["num_gpus"] == 1.0
    assert _options(cluster_has_gpus=False)["ray_actor_options"]["num_gpus"] == 0.0
    half = _options(cluster_has_gpus=True, ray_gpus_per_replica=0.5)
    assert half["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}


def test_replicas_shut_down_as_gracefully_as_the_single_process() -> None:
    assert _options(graceful_shutdown_s=12)["graceful_shutdown_timeout_s"] == 12


def test_the_options_are_accepted_by_serve() -> None:
    """Every key is one of Serve's deployment options, with a value it accepts."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from service.ray_serve.deployment import GradCamReplica, application

    settings = Settings(ray_max_replicas=3, models=[{"name": "m", "architecture": "resnet18"}])
    app = application(settings, cluster_has_gpus=False)
    deployment = app._bound_deployment  # the one deployment of the application
    assert deployment.name == GradCamReplica.name
    assert deployment.max_ongoing_requests == settings.max_queue_size + settings.max_batch_size
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3


def test_a_config_files_unknown_setting_is_refused_before_the_cluster_is_asked() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from service.ray_serve.deployment import build

    with pytest.raises(ValueError, match="ray_max_replica"):
        build({"ray_max_replica": 4, "max_batch_size": 8})
