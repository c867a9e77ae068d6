"""Command line: ``gradcam-service`` serves the API; ``gradcam-service ray`` serves it on Ray
Serve (N replicas; the ``ray`` extra); ``gradcam-service export-openapi`` writes the OpenAPI
document without loading any model; ``gradcam-service explain`` and ``gradcam-service evaluate``
work on local image files in process (:mod:`service.local`). ``python -m service`` is the same
command.

Configuration comes from ``GRADCAM_*`` environment variables (see :mod:`service.settings`); the
local commands use the models the server would serve.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.logs import configure_logging
from service.settings import ConfigError, Settings, validation_summary

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


def _local_command(run: Callable[[Settings], int], args: argparse.Namespace) -> int:
    """Run a local command with the server's settings (``--models-file`` wins over the
    environment); a problem the user must fix is one line on stderr and exit status 2."""
    from service.errors import ServiceError
    from service.local.files import CommandError

    overrides: dict[str, Any] = {}
    if args.models_file is not None:
        overrides["models_file"] = args.models_file
    settings = _load_settings(**overrides)
    if settings is None:
        return 2
    try:
        return run(settings)
    except (CommandError, ConfigError) as exc:
        print(f"gradcam-service: {exc}", file=sys.stderr)
    except ServiceError as exc:
        print(f"gradcam-service: {exc.detail}", file=sys.stderr)
    return 2


def explain_command(args: argparse.Namespace) -> int:
    from service.local.explain_files import ExplainOptions, explain_files
    from service.local.files import load_configured_model

    def run(settings: Settings) -> int:
        options = ExplainOptions(
            layers=tuple(args.layer or ()),
            layer_index=args.layer_index,
            targets=tuple(args.target or ()),
            top_k=args.top_k,
            method=args.method,
            threshold=args.threshold,
            colormap=args.colormap,
            alpha=args.alpha,
            batch_size=args.batch_size,
        )
        model = load_configured_model(settings, args.model, args.device)
        limits = settings.runtime_config().image_limits
        return explain_files(model, args.paths, options, limits)

    return _local_command(run, args)


def evaluate_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from service.engine.faithfulness.scores import DEFAULT_ROAD_PERCENTILES, ScoreOptions
    from service.errors import ServiceError
    from service.local.evaluate import EvaluateOptions, evaluate, load_annotations
    from service.local.files import CommandError, load_configured_model

    def run(settings: Settings) -> int:
        annotations = load_annotations(args.labels) if args.labels is not None else {}
        model = load_configured_model(settings, args.model, args.device)
        try:
            named = [model.layer(name).name for name in args.layer or ()]
            named += [model.layer(index=i).name for i in args.layer_index or ()]
        except ServiceError as exc:
            raise CommandError(exc.detail) from None
        layers = (
            named
            or [info.name for info in model.layers if info.layer_index is not None]
            or [model.default_layer]
        )
        names = [] if args.scores == ["none"] else args.scores or list(DEFAULT_EVALUATE_SCORES)
        scores = None
        if names:
            scores = ScoreOptions(
                names=tuple(dict.fromkeys(names)),
                road_percentiles=tuple(args.road_percentiles or DEFAULT_ROAD_PERCENTILES),
                curve_step=args.curve_step,
            )
        options = EvaluateOptions(
            layers=tuple(dict.fromkeys(layers)),
            methods=tuple(dict.fromkeys(args.method or ["gradcam"])),
            scores=scores,
            pointing_tolerance=args.pointing_tolerance,
            rank_by=args.rank_by,
            batch_size=args.batch_size,
            score_batch_size=settings.score_batch_size,
            thumbnails=args.thumbnails,
        )
        return evaluate(
            model,
            args.folder,
            args.output,
            options,
            annotations=annotations,
            limits=settings.runtime_config().image_limits,
            fresh=args.fresh,
            command=shlex.join(["gradcam-service", *argv]),
        )

    return _local_command(run, args)


_N = TypeVar("_N", int, float)


def _bounded(
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


_POSITIVE_INT = _bounded(int, "a whole number of 1 or more", 1)
_COUNT = _bounded(int, "a whole number of 0 or more", 0)
_PIXELS = _bounded(float, "a number of pixels, 0 or more", 0.0)
_FRACTION = _bounded(float, "a number from 0 to 1", 0.0, 1.0)


#: Scores ``evaluate`` computes unless told otherwise (the cheaper ones: 9 passes a map).
DEFAULT_EVALUATE_SCORES = ("confidence_change", "drop", "increase", "road")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the configured model to use (default: the only one)")
    parser.add_argument(
        "--models-file",
        type=Path,
        help="a models file (YAML or JSON) instead of GRADCAM_MODELS_FILE / GRADCAM_MODELS",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: GRADCAM_DEVICE, auto)")


def _add_local_commands(commands: Any) -> None:
    from service.engine.cam.methods import METHOD_NAMES
    from service.engine.faithfulness.scores import DEFAULT_CURVE_STEP, SCORE_NAMES
    from service.engine.pictures.overlays import COLORMAPS, DEFAULT_COLORMAP
    from service.local.evaluate import ENERGY, POINTING

    explain = commands.add_parser(
        "explain",
        help="explain local image files in process; write overlay, panel and map next to each",
        description="Explain image files (or every image in folders) with a configured model,"
        " in process. For each map, writes <stem>.<method>.<layer>.<class>.overlay.png,"
        " .panel.png and .npy (the map on the layer's grid, rectified, not normalised) next to"
        " the image; the stem is the whole file name where two images of a folder share a stem,"
        " the class its label and index where two classes share a label. Pictures of an earlier"
        " run found in folders are left out.",
    )
    explain.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    _model_options(explain)
    explain.add_argument(
        "--layer",
        action="append",
        help="layer by module path (repeatable; default: the model's default layer)",
    )
    explain.add_argument(
        "--layer-index",
        type=int,
        help="instead of --layer: the original script's layer_idx (ResNet: 2 = layer4)",
    )
    explain.add_argument(
        "--target",
        action="append",
        help="class by index or label (repeatable; default: the --top-k predicted)",
    )
    explain.add_argument(
        "--top-k", type=_POSITIVE_INT, default=1, help="without --target (default 1)"
    )
    explain.add_argument("--method", default="gradcam", choices=METHOD_NAMES)
    explain.add_argument(
        "--threshold",
        type=_FRACTION,
        help="the original script's floor, e.g. 0.125, instead of ReLU",
    )
    explain.add_argument("--colormap", default=DEFAULT_COLORMAP, choices=COLORMAPS)
    explain.add_argument("--alpha", type=_FRACTION, default=0.5, help="heatmap opacity (0.5)")
    explain.add_argument("--batch-size", type=_POSITIVE_INT, default=8, help="images per batch (8)")

    evaluate = commands.add_parser(
        "evaluate",
        help="rank layers and methods on a folder of images; write a Markdown and HTML report",
        description="Explain every image of a folder with each layer and method, measure the"
        " maps (pointing game and energy in box where a labels file gives boxes or masks;"
        " faithfulness scores) and rank the (layer, method) pairs. Ctrl-C writes the report"
        " from the images done; running the same command again carries on.",
    )
    evaluate.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    evaluate.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("gradcam-evaluation"),
        help="folder for results.jsonl, thumbnails/, report.md and report.html"
        " (default: gradcam-evaluation)",
    )
    evaluate.add_argument(
        "--labels",
        type=Path,
        help='JSON: {"<image, relative to the folder>": {"label": <class index or name>,'
        ' "boxes": [[left, top, right, bottom], ...], "mask": "<mask image>"}}',
    )
    _model_options(evaluate)
    evaluate.add_argument(
        "--layer",
        action="append",
        help="layer by module path (repeatable; default: every layer with a layer_index)",
    )
    evaluate.add_argument("--layer-index", type=int, action="append", help="(repeatable)")
    evaluate.add_argument(
        "--method", action="append", choices=METHOD_NAMES, help="(repeatable; default gradcam)"
    )
    evaluate.add_argument(
        "--scores",
        action="append",
        choices=[*SCORE_NAMES, "none"],
        help="(repeatable; default: " + ", ".join(DEFAULT_EVALUATE_SCORES) + ")",
    )
    evaluate.add_argument(
        "--road-percentiles", type=int, action="append", help="(repeatable; default 20 40 60 80)"
    )
    evaluate.add_argument(
        "--curve-step",
        type=float,
        default=DEFAULT_CURVE_STEP,
        help=f"deletion and insertion: fraction of pixels per step ({DEFAULT_CURVE_STEP})",
    )
    evaluate.add_argument(
        "--pointing-tolerance",
        type=_PIXELS,
        default=0.0,
        help="pixels the map's peak may lie off the object and still count (default 0)",
    )
    evaluate.add_argument(
        "--rank-by",
        choices=[POINTING, ENERGY, *SCORE_NAMES],
        metavar="MEASURE",
        help="pointing_game, energy_in_box or a score (default: pointing_game with boxes,"
        " else the first score)",
    )
    evaluate.add_argument(
        "--batch-size", type=_POSITIVE_INT, default=8, help="images per batch (8)"
    )
    evaluate.add_argument(
        "--thumbnails", type=_COUNT, default=6, help="images shown per row in report.html (6)"
    )
    evaluate.add_argument(
        "--fresh", action="store_true", help="discard the results of an earlier run"
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
    _add_local_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
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
    if args.command == "explain":
        return explain_command(args)
    if args.command == "evaluate":
        return evaluate_command(args, arguments)
    return serve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
