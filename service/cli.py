"""Command line: ``gradcam-service`` serves the API; ``gradcam-service ray`` serves it on Ray
Serve (N replicas; the ``ray`` extra); ``gradcam-service export-openapi`` writes the OpenAPI
document without loading any model; ``gradcam-service explain`` and ``gradcam-service evaluate``
work on local image files in process (:mod:`service.local`). ``python -m service`` is the same
command.

Each command is one module holding its parser and its runner (:mod:`service.commands`; ``ray``'s
is :mod:`service.ray_serve.command`, which imports Ray only when it runs); this module registers
them and dispatches to them.

Configuration comes from ``GRADCAM_*`` environment variables (see :mod:`service.settings`); the
local commands use the models the server would serve.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Command(Protocol):
    """A command's module: it registers its parser, and runs the arguments parsed."""

    def add_parser(self, commands: Any) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace, argv: Sequence[str]) -> int: ...


def commands() -> list[Command]:
    """Every command, in the order ``--help`` lists them; the first is the default."""
    from service.commands import evaluate, explain, export_openapi, serve
    from service.ray_serve import command as ray

    return [serve, ray, export_openapi, explain, evaluate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcam-service",
        description="Grad-CAM inference and explanation REST service. Configured with"
        " GRADCAM_* environment variables (see the README).",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands():
        command.add_parser(subcommands).set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    run: Callable[[argparse.Namespace, Sequence[str]], int] = getattr(
        args, "run", commands()[0].run
    )
    return run(args, arguments)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
