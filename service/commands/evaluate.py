"""``gradcam-service evaluate``: rank layers and methods on a folder of images and write a
Markdown and HTML report (:mod:`service.local.evaluate`); here its options, resolved against
the model into :class:`~service.local.evaluate.options.EvaluateOptions`."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

from service.commands.common import (
    COUNT,
    PIXELS,
    POSITIVE_INT,
    Subcommands,
    local_command,
    model_options,
)
from service.engine.cam.methods import METHOD_NAMES
from service.engine.faithfulness.scores import (
    DEFAULT_CURVE_STEP,
    SCORE_NAMES,
)
from service.engine.plan import resolve_layers, score_options
from service.local.evaluate.annotations import load_annotations
from service.local.evaluate.localisation import ENERGY, POINTING
from service.local.evaluate.options import EvaluateOptions
from service.local.evaluate.runner import evaluate
from service.local.files import load_configured_model
from service.settings import Settings

#: Scores ``evaluate`` computes unless told otherwise (the cheaper ones: 9 passes a map).
DEFAULT_EVALUATE_SCORES = ("confidence_change", "drop", "increase", "road")


def add_parser(commands: Subcommands) -> argparse.ArgumentParser:
    evaluate: argparse.ArgumentParser = commands.add_parser(
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
    model_options(evaluate)
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
        type=PIXELS,
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
    evaluate.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images per batch (8)")
    evaluate.add_argument(
        "--thumbnails",
        type=COUNT,
        default=6,
        help="images shown per layer and method in report.html (6)",
    )
    evaluate.add_argument(
        "--fresh", action="store_true", help="discard the results of an earlier run"
    )
    return evaluate


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    def run(settings: Settings) -> int:
        annotations = load_annotations(args.labels) if args.labels is not None else {}
        model = load_configured_model(settings, args.model, args.device)
        layers = (
            resolve_layers(model, args.layer or (), args.layer_index or ())
            or [info.name for info in model.layers if info.layer_index is not None]
            or [model.default_layer]
        )
        names = [] if args.scores == ["none"] else args.scores or list(DEFAULT_EVALUATE_SCORES)
        scores = score_options(names, args.road_percentiles or (), args.curve_step)
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

    return local_command(run, args)
