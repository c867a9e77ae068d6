"""The Ray Serve deployment's options, from the service's settings. Imports no Ray.

How the limits fit together:

- Batching stays the service's own: each replica runs one runtime whose batcher forms batches
  from the requests that replica holds. Serve hands a replica at most
  ``max_ongoing_requests`` requests at once (Serve's default of 5 would cap a batch at 5
  one-image requests), so its default is the runtime's queue bound plus one batch: every request
  the replica's admission could accept reaches it.
- Overload is therefore answered by each replica's own admission, time-bounded and per caller,
  with the API's 429 problem and ``Retry-After`` from its measured throughput. Serve's own
  backpressure (``max_queued_requests``) would answer with Serve's plain-text error instead, and
  counts requests, not images or callers; it stays unbounded (-1, Serve's default), so requests
  wait in Serve's router only while no replica has a free slot, e.g. while replicas start.
- Autoscaling targets ongoing requests per replica; the default target is two batches (one
  computing, the next one filling), the most a replica holds while it still answers at its
  lowest latency (see bench/README.md for the arithmetic towards a p99 target).
"""

from __future__ import annotations

from typing import Any

from service.settings import Settings

#: The application's name in Serve, and its one deployment's.
APP_NAME = "gradcam"
DEPLOYMENT_NAME = "GradCam"
#: A replica whose models fail to load is retried this often before the deployment fails
#: (Serve's default, 20, would load a broken model 20 times before saying so).
CONSTRUCTOR_RETRIES = 3


def max_ongoing_requests(settings: Settings) -> int:
    """Requests one replica holds at once: every image its queue admits, plus a running batch."""
    if settings.ray_max_ongoing_requests is not None:
        return settings.ray_max_ongoing_requests
    return settings.max_queue_size + settings.max_batch_size


def target_ongoing_requests(settings: Settings) -> float:
    """Autoscaling's target per replica: one batch computing and the next one filling."""
    if settings.ray_target_ongoing_requests is not None:
        return settings.ray_target_ongoing_requests
    return 2.0 * settings.max_batch_size


def autoscales(settings: Settings) -> bool:
    return settings.ray_max_replicas is not None


def deployment_options(settings: Settings, *, cluster_has_gpus: bool) -> dict[str, Any]:
    """Keyword arguments of ``Deployment.options`` for these settings.

    ``cluster_has_gpus``: whether replicas take one GPU each when ``ray_gpus_per_replica`` is
    not set (each replica's runtime then sees just that GPU, its ``CUDA_VISIBLE_DEVICES``).
    """
    gpus = settings.ray_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_has_gpus else 0.0
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests(settings),
        "max_queued_requests": -1,
        "ray_actor_options": {"num_cpus": settings.ray_cpus_per_replica, "num_gpus": gpus},
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_s,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if settings.ray_max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas or 1,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": target_ongoing_requests(settings),
        }
    else:
        options["num_replicas"] = settings.ray_replicas
    return options


def describe(settings: Settings) -> str:
    """The scale, in words, for the start-up log line."""
    if settings.ray_max_replicas is not None:
        return (
            f"{settings.ray_min_replicas or 1} to {settings.ray_max_replicas} replicas"
            f" (autoscaling at {target_ongoing_requests(settings):g} ongoing requests each)"
        )
    return f"{settings.ray_replicas} replica{'s' if settings.ray_replicas != 1 else ''}"
