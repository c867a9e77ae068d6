"""Score benchmark: what each faithfulness score costs, in forward-pass equivalents and ms.

For a batch of images it computes Grad-CAM maps once, then each score alone (and all of them
together) on those maps, ``--repeats`` times, and reports per map:

- the forward passes the cost rule counts (``ScoreOptions.passes``, what the cap checks);
- the median time, in milliseconds and in forward-pass equivalents: the time of one image's
  forward pass when ``--score-batch`` images go through the model together under
  ``torch.inference_mode()`` (how the scores run their perturbed inputs), timed back to back
  with each score call so that the ratio holds on a machine whose speed drifts;
- for ROAD, the part spent imputing (the sparse solves, timed alone on the same masks), and,
  once, what pytorch-grad-cam's imputer takes on the same masks.

Weights are random (the time does not depend on their values); inputs are seeded.

Usage (from the repository root, in the project's venv with the ``bench`` extra):
    python bench/score_bench.py --output bench/results/scores_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import emit  # noqa: E402
from service.engine.cam.explain import CamMap, ImageRequest, explain  # noqa: E402
from service.engine.faithfulness.imputation import impute_many  # noqa: E402
from service.engine.faithfulness.scores import SCORE_NAMES, ScoreOptions, road_masks, score_maps  # noqa: E402
from service.engine.loading import load_model  # noqa: E402
from service.engine.models.spec import ModelSpec  # noqa: E402


def _interleaved(
    unit: Callable[[], object], fn: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``fn`` and median of its time over ``unit``'s, run back to back
    (unit, fn, unit, fn, ...) after one warm-up of each, so that drift in the machine's speed
    (other work on its cores) hits both alike."""
    unit()
    fn()
    seconds, ratios = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        unit()
        unit_s = time.perf_counter() - started
        started = time.perf_counter()
        fn()
        fn_s = time.perf_counter() - started
        seconds.append(fn_s)
        ratios.append(fn_s / unit_s)
    return statistics.median(seconds), statistics.median(ratios)


def _reference_imputation_s(
    maps: list[CamMap], x: torch.Tensor, percentiles: tuple[int, ...]
) -> float:
    """pytorch-grad-cam's NoisyLinearImputer (the ROAD authors' code) on the same masks."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    imputer = NoisyLinearImputer(noise=0.0)
    started = time.perf_counter()
    for i, cam in enumerate(maps):
        for keep in road_masks(cam.input_map, percentiles):
            imputer(x[i], torch.from_numpy(keep.astype(np.float32)))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--images", type=int, default=4, help="maps scored per call (one each)")
    parser.add_argument("--score-batch", type=int, default=32, help="GRADCAM_SCORE_BATCH_SIZE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference imputer")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = ModelSpec(name=args.arch.replace("_", "-"), architecture=args.arch, weights="random")
    model = load_model(spec, device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, *model.input_size, generator=generator)
    maps = [
        image_maps[0]
        for image_maps in explain(
            model, x, [ImageRequest(layers=(args.layer,)) for _ in range(args.images)]
        ).maps
    ]
    per_image = [[cam] for cam in maps]

    batch = torch.randn(args.score_batch, 3, *model.input_size, generator=generator).to(device)

    def forward() -> None:
        with torch.inference_mode():
            model.module(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    images = [x[i].numpy() for i in range(args.images)]

    def impute() -> None:
        """ROAD's solves alone, on the masks of the default percentiles."""
        for image, cam in zip(images, maps, strict=True):
            impute_many(image, road_masks(cam.input_map, ScoreOptions(("road",)).road_percentiles))

    unit_s, _ = _interleaved(forward, forward, args.repeats)
    pass_ms = 1000 * unit_s / args.score_batch
    defaults = ScoreOptions(names=SCORE_NAMES)
    lines = [
        f"Command: `{shlex.join(['python', 'bench/score_bench.py', *(argv or sys.argv[1:])])}`",
        "",
        f"{args.arch} (random weights), Grad-CAM at {args.layer}, {args.images} maps (one per"
        f" image) scored per call with the API's defaults (ROAD percentiles"
        f" {', '.join(map(str, defaults.road_percentiles))}, curve_step {defaults.curve_step});"
        f" median of {args.repeats} calls after one warm-up. One forward-pass equivalent: one"
        f" image's share of a forward pass of {args.score_batch} images under inference_mode"
        f" (median {pass_ms:.1f} ms), timed back to back with each call; the equivalents are the"
        " median of those ratios.",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        f" with {torch.get_num_threads()} intra-op threads, Python {platform.python_version()}",
        f"- device: {device}",
        "",
        "| score | forward passes per map | ms per map | forward-pass equivalents per map"
        " | of which imputation, ms per map |",
        "|---|---:|---:|---:|---:|",
    ]
    for names in [(name,) for name in SCORE_NAMES] + [SCORE_NAMES]:
        options = ScoreOptions(names=names)

        def run(options: ScoreOptions = options) -> None:
            for cam in maps:
                cam.scores.clear()
            score_maps(model, x, per_image, options, batch_size=args.score_batch)

        seconds, ratio = _interleaved(forward, run, args.repeats)
        # One forward-pass equivalent is 1/score_batch of the unit's batch, per map.
        equivalents = ratio * args.score_batch / args.images
        imputation = "-"
        if "road" in names:
            imputed_s, _ = _interleaved(forward, impute, args.repeats)
            imputation = f"{1000 * imputed_s / args.images:.0f}"
        label = "all six" if len(names) > 1 else names[0]
        lines.append(
            f"| {label} | {options.passes_per_map()} (+{options.passes_per_image()} per image)"
            f" | {1000 * seconds / args.images:.0f} | {equivalents:.1f} | {imputation} |"
        )
    if not args.no_reference:
        reference_ms = 1000 * _reference_imputation_s(maps, x, defaults.road_percentiles)
        lines += [
            "",
            "pytorch-grad-cam's imputer on the same ROAD masks (one run):"
            f" {reference_ms / args.images:.0f} ms per map.",
        ]
    emit("\n".join(lines), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
