"""``gradcam-service`` / ``gradcam-service serve`` (the default command): the API on uvicorn,
shut down gracefully on SIGTERM or SIGINT with exit status 0."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from service.commands.common import Subcommands, load_settings
from service.engine.pictures.overlays import close_encoders
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
    close_encoders()  # idle pool threads, not loads: they must not count as busy below
    _exit_without_waiting_for_loads()
    return 0


def _exit_without_waiting_for_loads(grace_s: float = 0.5) -> None:
    """After the graceful shutdown nothing is served any more, but a model still loading (a
    download, a large checkpoint) keeps its thread busy, and the interpreter joins such threads
    before it exits: a SIGTERM during loading lived on for the whole load. Busy threads get
    ``grace_s``; then the process exits at once, its logs flushed."""
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    busy = [
        t.name
        for t in threading.enumerate()
        if t is not threading.current_thread() and not t.daemon and t.is_alive()
    ]
    if busy:
        logger.info("exiting without waiting for %s (a model still loading)", ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
