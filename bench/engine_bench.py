"""Engine benchmark: what an explanation costs next to plain inference and the reference library.

For each case (model, layer, batch) it measures, in one run and on the same inputs:

- inference: ``model(x)`` under ``torch.inference_mode()``;
- ours: ``service.engine.cam.explain.explain(..., method="gradcam")`` (argmax targets, maps
  post-processed to the input size, as the service returns them);
- reference: pytorch-grad-cam's ``GradCAM`` (argmax targets) used as documented, on a copy of
  the same network whose parameters require gradients (``--reference-model frozen`` runs it on
  our frozen model instead, with an input that requires grad so that a gradient can flow).

One warm-up run of each, then ``--repeats`` rounds in which the three run back to back
(A, B, C, A, B, C, ...) so that drift in the machine's speed hits all three alike. Reported:
medians. Weights are random: the time does not depend on their values.

Usage (from the repository root, in the project's venv with the ``bench`` extra):
    python bench/engine_bench.py --output bench/results/engine_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.cam.explain import ImageRequest, explain  # noqa: E402
from service.engine.loading import load_model  # noqa: E402
from service.engine.models.loaded import LoadedModel  # noqa: E402
from service.engine.models.spec import ModelSpec  # noqa: E402


@dataclass(frozen=True)
class Case:
    arch: str
    layer: str
    batch: int
    stage: str  # "last" or "middle": which target applies


DEFAULT_CASES = [
    Case("resnet50", "layer4", 1, "last"),
    Case("resnet50", "layer4", 8, "last"),
    Case("resnet50", "layer3", 8, "middle"),
    Case("vit_small_patch16_224", "blocks.11.norm1", 8, "last"),
]
# Targets from the issue: explain cost as a multiple of inference, and speed-up over the reference.
TARGET_LAST = 1.15
TARGET_MIDDLE = 1.4
TARGET_SPEEDUP = 2.5


@dataclass
class Row:
    case: Case
    inference_ms: float
    ours_ms: float
    reference_ms: float

    @property
    def ours_x(self) -> float:
        return self.ours_ms / self.inference_ms

    @property
    def reference_x(self) -> float:
        return self.reference_ms / self.inference_ms

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.ours_ms

    def meets_targets(self) -> bool:
        limit = TARGET_LAST if self.case.stage == "last" else TARGET_MIDDLE
        return self.ours_x <= limit and self.speedup >= TARGET_SPEEDUP


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


def _reference_cam(
    model: LoadedModel, layer: str, frozen: bool
) -> tuple[object, torch.nn.Module, bool]:
    from pytorch_grad_cam import GradCAM

    # Default use: the network as loaded for training or fine-tuning, parameters requiring grad.
    network = model.module if frozen else copy.deepcopy(model.module).requires_grad_(True)
    module = dict(network.named_modules())[layer]
    info = model.layer(layer)
    reshape = None if info.layout == "channels_first" else info.to_grid
    return GradCAM(network, [module], reshape_transform=reshape), network, frozen


def run_case(case: Case, device: torch.device, repeats: int, frozen_reference: bool) -> Row:
    torch.manual_seed(0)
    spec = ModelSpec(name=case.arch.replace("_", "-"), architecture=case.arch, weights="random")
    model = load_model(spec, device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, 3, *model.input_size, generator=generator).to(device)
    requests = [ImageRequest(layers=(case.layer,))] * case.batch
    cam, _network, frozen = _reference_cam(model, case.layer, frozen_reference)

    def inference() -> object:
        with torch.inference_mode():
            return model.module(x)

    def ours() -> object:
        return explain(model, x, requests, method="gradcam")

    def reference() -> object:
        inputs = x.clone().requires_grad_(True) if frozen else x
        return cam(input_tensor=inputs, targets=None)  # type: ignore[operator]

    functions = {"inference": inference, "ours": ours, "reference": reference}
    times: dict[str, list[float]] = {name: [] for name in functions}
    for fn in functions.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            times[name].append(_timed(fn, device))
    cam.activations_and_grads.release()  # type: ignore[attr-defined]
    return Row(
        case=case,
        inference_ms=statistics.median(times["inference"]),
        ours_ms=statistics.median(times["ours"]),
        reference_ms=statistics.median(times["reference"]),
    )


def _machine(device: torch.device) -> list[str]:
    import timm

    try:
        from importlib.metadata import version

        gradcam_version = version("grad-cam")
    except Exception:  # pragma: no cover - reporting only
        gradcam_version = "unknown"
    lines = [
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'n/a'})",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads;"
        f" timm {timm.__version__}; grad-cam {gradcam_version}; Python {platform.python_version()}",
        f"- device: {device}",
    ]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    return lines


def render(rows: list[Row], device: torch.device, repeats: int, frozen: bool) -> str:
    reference_kind = (
        "frozen model, input requires grad" if frozen else "parameters require grad (default use)"
    )
    out = [
        f"Median of {repeats} interleaved runs after 1 warm-up; random weights;"
        f" reference: pytorch-grad-cam GradCAM, {reference_kind}.",
        "",
        *_machine(device),
        "",
        "| model | layer | batch | inference ms | ours ms | reference ms |"
        " ours/inference (x) | reference/inference (x) | speed-up vs reference (x) | targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        limit = TARGET_LAST if row.case.stage == "last" else TARGET_MIDDLE
        verdict = "met" if row.meets_targets() else "MISSED"
        out.append(
            f"| {row.case.arch} | {row.case.layer} | {row.case.batch} |"
            f" {row.inference_ms:.1f} | {row.ours_ms:.1f} | {row.reference_ms:.1f} |"
            f" {row.ours_x:.2f} | {row.reference_x:.2f} | {row.speedup:.2f} |"
            f" {verdict} (<= {limit}x, >= {TARGET_SPEEDUP}x) |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(v) for v in s.split(",") if v],
        default=None,
        help="comma-separated batch sizes to run every (model, layer) at, e.g. 1,8;"
        " default: the issue's cases (resnet50 layer4 at 1 and 8, layer3 and vit at 8)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--reference-model",
        choices=("default", "frozen"),
        default="default",
        help="run the reference on a copy whose parameters require grad (default), or on our"
        " frozen model with an input that requires grad",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = DEFAULT_CASES
    if args.batch_sizes:
        pairs = list(dict.fromkeys((c.arch, c.layer, c.stage) for c in DEFAULT_CASES))
        cases = [Case(a, layer, b, s) for a, layer, s in pairs for b in args.batch_sizes]

    frozen = args.reference_model == "frozen"
    rows = []
    for case in cases:
        print(f"running {case.arch} {case.layer} batch {case.batch} ...", file=sys.stderr)
        rows.append(run_case(case, device, args.repeats, frozen))
    table = render(rows, device, args.repeats, frozen)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        command = "python " + " ".join(["bench/engine_bench.py", *(argv or sys.argv[1:])])
        args.output.write_text(f"Command: `{command}`\n\n{table}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
