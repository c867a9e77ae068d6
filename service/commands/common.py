"""What the commands share: the settings with command-line overrides (invalid configuration
reported in one line), the bounded number types of their options, the ``--model``,
``--models-file`` and ``--device`` options of the local commands and the wrapper that runs
those, turning a problem the user must fix into one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.settings import ConfigError, Settings, validation_summary

#: What ``add_parser`` is given to register a command on: argparse's (private) sub-parsers action.
Subcommands = Any


def load_settings(**overrides: Any) -> Settings | None:
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


def local_command(run: Callable[[Settings], int], args: argparse.Namespace) -> int:
    """Run a local command with the server's settings (``--models-file`` wins over the
    environment); a problem the user must fix is one line on stderr and exit status 2."""
    from service.errors import ServiceError
    from service.local.files import CommandError

    overrides: dict[str, Any] = {}
    if args.models_file is not None:
        overrides["models_file"] = args.models_file
    settings = load_settings(**overrides)
    if settings is None:
        return 2
    try:
        return run(settings)
    except (CommandError, ConfigError) as exc:
        print(f"gradcam-service: {exc}", file=sys.stderr)
    except ServiceError as exc:
        print(f"gradcam-service: {exc.detail}", file=sys.stderr)
    return 2


_N = TypeVar("_N", int, float)


def bounded(
    convert: Callable[[str], _N], what: str, low: _N, high: _N | None = None
) -> Callable[[str], _N]:
    """An argparse type: ``convert``, refused outside [``low``, ``high``] (and NaN, infinity)
    with a line naming the option and exit status 2, before any model or image is loaded; a
    batch size of 0 would crash range(), a negative one would silently do nothing."""

    def parse(text: str) -> _N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        if not (math.isfinite(value) and low <= value and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}")
        return value

    return parse


POSITIVE_INT = bounded(int, "a whole number of 1 or more", 1)
COUNT = bounded(int, "a whole number of 0 or more", 0)
PIXELS = bounded(float, "a number of pixels, 0 or more", 0.0)
FRACTION = bounded(float, "a number from 0 to 1", 0.0, 1.0)


def model_options(parser: argparse.ArgumentParser) -> None:
    """The local commands' choice of model: ``--model``, ``--models-file``, ``--device``."""
    parser.add_argument("--model", help="the configured model to use (default: the only one)")
    parser.add_argument(
        "--models-file",
        type=Path,
        help="a models file (YAML or JSON) instead of GRADCAM_MODELS_FILE / GRADCAM_MODELS",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: GRADCAM_DEVICE, auto)")
