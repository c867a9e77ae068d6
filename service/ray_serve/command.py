"""``gradcam-service ray``: the service on Ray Serve, in one command.

With ``RAY_ADDRESS`` it joins that cluster and, on SIGTERM or SIGINT, deletes its application
and leaves the cluster running. Without it, it starts a local Ray on loopback (usage statistics
off, no dashboard) and on SIGTERM stops the application, Serve and that Ray, so no process is
left behind. Serve's HTTP proxy listens on ``GRADCAM_HOST``:``GRADCAM_PORT``, as the single
process does.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any

from service.ray_serve.options import APP_NAME, DEPLOYMENT_NAME, describe
from service.settings import Settings

logger = logging.getLogger("service.ray_serve")

#: Set unless the environment says otherwise: no usage report leaves the machine, and a local
#: Ray writes no authentication token under the home directory.
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


class _StopSignal(Exception):  # noqa: N818 (a signal, not an error)
    """Raised in the main thread by SIGTERM or SIGINT: start-up is abandoned or serving ends."""


def _stop(signum: int, frame: FrameType | None) -> None:
    # Once stopping has begun, further signals are ignored so that the clean-up completes.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise _StopSignal(signal.Signals(signum).name)


def _deployment_failure(serve: Any) -> str:
    """Why the deployment failed, as Serve recorded it: the last line of its message (a
    replica's exception, e.g. the model that did not load), or nothing if Serve cannot say."""
    try:
        application = serve.status().applications[APP_NAME]
        message = str(application.deployments[DEPLOYMENT_NAME].message)
    except Exception:
        return ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f" ({lines[-1]})" if lines else ""


def run(
    settings: Settings, *, num_cpus: int | None = None, object_store_mb: int | None = None
) -> int:
    """Serve the application until SIGTERM/SIGINT; 0 after a clean stop, 1 if it failed to
    start. ``num_cpus`` and ``object_store_mb`` bound a local Ray (Ray's defaults otherwise:
    every core, 30% of the memory)."""
    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from service.ray_serve.deployment import application, cluster_has_gpus

    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 1024 * 1024 if object_store_mb else None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    else:
        ray.init(address=address)
    # ray.init replaces the SIGTERM handler; ours ends start-up or serving, then cleans up.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    status = 0
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        has_gpus = cluster_has_gpus()
        serve.run(application(settings, cluster_has_gpus=has_gpus), name=APP_NAME, route_prefix="/")
        logger.info(
            "serving on http://%s:%d on Ray Serve (%s, %s): %s",
            settings.host,
            settings.port,
            f"cluster {address}" if address else "local Ray",
            "GPUs" if has_gpus else "no GPU",
            describe(settings),
        )
        while True:
            time.sleep(3600)
    except _StopSignal as stop:
        logger.info("%s: stopping the application%s", stop, "" if address else " and Ray")
    except Exception as exc:
        logger.error("the application did not start: %s%s", exc, _deployment_failure(serve))
        status = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            if address is None:
                serve.shutdown()  # type: ignore[no-untyped-call]
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    return status
