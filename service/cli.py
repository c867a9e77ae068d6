"""Command line: ``gradcam-service`` serves the API; ``gradcam-service ray`` serves it on Ray
Serve (N replicas; the ``ray`` extra); ``gradcam-service export-openapi`` writes the OpenAPI
document without loading any model. ``python -m service`` is the same command.

Configuration comes from ``GRADCAM_*`` environment variables (see :mod:`service.config`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.config import ConfigError, Settings, validation_summary
from service.logs import configure_logging

logger = logging.getLogger("service")

DEFAULT_OPENAPI_PATH = Path("openapi/openapi.json")


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document; independent of the environment, loads no model."""
    from service.api.app import create_app

    app = create_app(Settings.model_construct(), runtime=None)
    return app.openapi()


def render_openapi() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export_openapi(output: str) -> int:
    text = render_openapi()
    if output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _load_settings(**overrides: Any) -> Settings | None:
    """The settings from the environment, with ``overrides`` (command-line options) on top."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = validation_summary(exc, as_variables=True)
    except SettingsError as exc:  # a list setting that is not JSON, e.g. GRADCAM_API_KEYS
        # Its message names the variable; the value is never quoted (it may be a secret).
        problems = str(exc).split(":", 1)[0]
    print(f"gradcam-service: invalid configuration: {problems}", file=sys.stderr)
    return None


def _already_shut_down(signum: int, frame: FrameType | None) -> None:
    """Receives the signal uvicorn re-raises once its graceful shutdown is complete."""


def serve() -> int:
    import uvicorn

    from service.api.app import create_app

    settings = _load_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    logger.info(
        "serving on http://%s:%d (device %s); models load in the background, GET /readyz",
        settings.host,
        settings.port,
        settings.device,
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal it caught
    # against the handler that was installed before it. With the default handler the process
    # would die of that signal after a clean shutdown; a no-op handler lets it exit with 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _already_shut_down)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,  # the app logs one line per request itself (service.access)
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
    )
    return 0


def serve_on_ray(args: argparse.Namespace) -> int:
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
    settings = _load_settings(**overrides)
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    try:
        from service.ray_serve.command import run
    except ImportError as exc:
        logger.error("Ray Serve is not installed (%s): pip install 'gradcam-service[ray]'", exc)
        return 2
    try:
        settings = settings.with_models_inline()
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    return run(settings, num_cpus=args.num_cpus, object_store_mb=args.object_store_mb)


def _add_ray_parser(commands: Any) -> None:
    ray = commands.add_parser(
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcam-service",
        description="Grad-CAM inference and explanation REST service. Configured with"
        " GRADCAM_* environment variables (see the README).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve the API (the default)")
    _add_ray_parser(commands)
    export = commands.add_parser(
        "export-openapi", help="write the OpenAPI document without loading any model"
    )
    export.add_argument(
        "--output",
        "-o",
        default=str(DEFAULT_OPENAPI_PATH),
        help=f"file to write, or - for stdout (default: {DEFAULT_OPENAPI_PATH})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export-openapi":
        return export_openapi(args.output)
    if args.command == "ray":
        if (args.num_cpus or args.object_store_mb) and os.environ.get("RAY_ADDRESS"):
            print(
                "gradcam-service: --num-cpus and --object-store-mb size a local Ray; RAY_ADDRESS"
                " names a running cluster, sized by itself",
                file=sys.stderr,
            )
            return 2
        return serve_on_ray(args)
    return serve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
