"""``gradcam-service explain``: explain local image files in process and write each map's
overlay, panel and raw map next to its image (:mod:`service.local.explain_files`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from service.commands.common import (
    FRACTION,
    POSITIVE_INT,
    Subcommands,
    local_command,
    model_options,
)
from service.engine.cam.methods import METHOD_NAMES
from service.engine.pictures.overlays import COLORMAPS, DEFAULT_COLORMAP
from service.local.explain_files import ExplainOptions, explain_files
from service.local.files import load_configured_model
from service.settings import Settings


def add_parser(commands: Subcommands) -> argparse.ArgumentParser:
    explain: argparse.ArgumentParser = commands.add_parser(
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
    model_options(explain)
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
        "--top-k", type=POSITIVE_INT, default=1, help="without --target (default 1)"
    )
    explain.add_argument("--method", default="gradcam", choices=METHOD_NAMES)
    explain.add_argument(
        "--threshold",
        type=FRACTION,
        help="the original script's floor, e.g. 0.125, instead of ReLU",
    )
    explain.add_argument("--colormap", default=DEFAULT_COLORMAP, choices=COLORMAPS)
    explain.add_argument("--alpha", type=FRACTION, default=0.5, help="heatmap opacity (0.5)")
    explain.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images per batch (8)")
    return explain


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
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

    return local_command(run, args)
