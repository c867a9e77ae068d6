"""``gradcam-service export-openapi``: the API's OpenAPI document, written without loading any
model (the committed ``openapi/openapi.json`` is this command's output)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.commands.common import Subcommands
from service.settings import Settings

DEFAULT_OPENAPI_PATH = Path("openapi/openapi.json")


def add_parser(commands: Subcommands) -> argparse.ArgumentParser:
    export: argparse.ArgumentParser = commands.add_parser(
        "export-openapi", help="write the OpenAPI document without loading any model"
    )
    export.add_argument(
        "--output",
        "-o",
        default=str(DEFAULT_OPENAPI_PATH),
        help=f"file to write, or - for stdout (default: {DEFAULT_OPENAPI_PATH})",
    )
    return export


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    return export_openapi(args.output)


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
