"""Command line: ``gradcam-service`` serves the API; ``gradcam-service export-openapi`` writes
the OpenAPI document without loading any model. ``python -m service`` is the same command.

Configuration comes from ``GRADCAM_*`` environment variables (see :mod:`service.config`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.config import ConfigError, Settings, validation_summary

logger = logging.getLogger("service")

DEFAULT_OPENAPI_PATH = Path("openapi/openapi.json")


class OneLineFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> <message>``, one line per record, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        line = f"{stamp} {record.levelname:<7} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc_info=" + json.dumps(self.formatException(record.exc_info))
        elif record.exc_text:
            line += " exc_info=" + json.dumps(record.exc_text)
        return line.replace("\n", "\\n")


def configure_logging(level: str) -> None:
    """Send every logger (uvicorn's included) through one one-line handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True


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


def _load_settings() -> Settings | None:
    try:
        return Settings()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcam-service",
        description="Grad-CAM inference and explanation REST service. Configured with"
        " GRADCAM_* environment variables (see the README).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve the API (the default)")
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
    return serve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
