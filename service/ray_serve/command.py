"""``gradcam-service ray``: the service on Ray Serve, in one command.

With ``RAY_ADDRESS`` it joins that cluster and, on SIGTERM or SIGINT, deletes its application
and leaves the cluster running. Without it, it starts a local Ray on loopback (usage statistics
off, no dashboard) and on SIGTERM stops the application, Serve and that Ray, so no process is
left behind. Serve's HTTP proxy listens on ``GRADCAM_HOST``:``GRADCAM_PORT``, as the single
process does.

The command's parser and its options are here too; they import no Ray (only
:func:`serve_on_ray` does, when it runs), so the parser is built with the other commands'.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from service.commands.common import Subcommands, load_settings
from service.logs import configure_logging
from service.ray_serve.options import APP_NAME, DEPLOYMENT_NAME, describe
from service.settings import ConfigError, Settings

logger = logging.getLogger("service.ray_serve")
#: The command's own lines (its options, its configuration), under the name every command uses.
command_logger = logging.getLogger("service")


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


def serve_on_ray(
    settings: Settings, *, num_cpus: int | None = None, object_store_mb: int | None = None
) -> int:
    """Serve the application until SIGTERM/SIGINT; 0 after a clean stop, 1 if it failed to
    start, 2 without Ray. ``num_cpus`` and ``object_store_mb`` bound a local Ray (Ray's
    defaults otherwise: every core, 30% of the memory)."""
    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        command_logger.error(
            "Ray Serve is not installed (%s): pip install 'gradcam-service[ray]'", exc
        )
        return 2

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


def add_parser(commands: Subcommands) -> argparse.ArgumentParser:
    ray: argparse.ArgumentParser = commands.add_parser(
        "ray",
        help="serve the API on Ray Serve: a local Ray on loopback, or the cluster in RAY_ADDRESS",
        description="Serve the same API on Ray Serve, N replicas each with its own models."
        " Options override the GRADCAM_RAY_* settings. RAY_ADDRESS joins an existing cluster;"
        " otherwise a local Ray is started on loopback and stopped on SIGTERM.",
    )
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, metavar="N", help="a fixed number of replicas")
    scale.add_argument("--max-replicas", type=int, metavar="N", help="autoscale up to N replicas")
    ray.add_argument(
        "--min-replicas", type=int, metavar="N", help="with --max-replicas: at least N (1)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        metavar="X",
        help="autoscaling target of ongoing requests per replica (2 x GRADCAM_MAX_BATCH_SIZE)",
    )
    ray.add_argument(
        "--num-cpus", type=int, metavar="N", help="CPUs of the local Ray (default: every core)"
    )
    ray.add_argument(
        "--object-store-mb",
        type=int,
        metavar="MB",
        help="object store of the local Ray (default: Ray's, 30%% of the memory)",
    )
    return ray


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """The command: its options over the settings, checked before any Ray starts."""
    if (args.num_cpus or args.object_store_mb) and os.environ.get("RAY_ADDRESS"):
        print(
            "gradcam-service: --num-cpus and --object-store-mb size a local Ray; RAY_ADDRESS"
            " names a running cluster, sized by itself",
            file=sys.stderr,
        )
        return 2
    overrides = {
        name: value
        for name, value in (
            ("ray_replicas", args.replicas),
            ("ray_min_replicas", args.min_replicas),
            ("ray_max_replicas", args.max_replicas),
            ("ray_target_ongoing_requests", args.target_ongoing_requests),
        )
        if value is not None
    }
    settings = load_settings(**overrides)
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    try:
        settings = settings.with_models_inline()
    except ConfigError as exc:
        command_logger.error("invalid configuration: %s", exc)
        return 2
    return serve_on_ray(settings, num_cpus=args.num_cpus, object_store_mb=args.object_store_mb)
