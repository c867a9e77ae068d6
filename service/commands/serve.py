"""``gradcam-service`` / ``gradcam-service serve`` (the default command): the API on uvicorn,
shut down gracefully on SIGTERM or SIGINT with exit status 0."""

from __future__ import annotations

import argparse
import logging
import math
import signal
from collections.abc import Sequence
from types import FrameType

from service.commands.common import Subcommands, load_settings
from service.logs import configure_logging
from service.settings import ConfigError

logger = logging.getLogger("service")


def add_parser(commands: Subcommands) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "serve", help="serve the API (the default)"
    )
    return parser


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    return serve()


def _already_shut_down(signum: int, frame: FrameType | None) -> None:
    """Receives the signal uvicorn re-raises once its graceful shutdown is complete."""


def serve() -> int:
    import uvicorn

    from service.api.app import create_app

    settings = load_settings()
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
