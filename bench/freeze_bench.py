"""Long jobs and everyone else: one heavy request must not freeze a model.

Prints one markdown table (and writes it with ``--output``). In one run, with the real server
(``gradcam-service``, resnet50 with random weights) over HTTP on loopback, for each long job
(Score-CAM at ``layer4``: 2048 masked forward passes; Grad-CAM with all six faithfulness
scores at their finest settings on 5 classes and 2 layers: 1170 passes and 180 ROAD solves):

- **refused up front**: on the default server (60 s deadline) the job is predicted from the
  measured seconds per forward pass; the time to its answer and the answer's status;
- **others while it runs**: on a server with a 600 s deadline (so the job is admitted), the
  p50/p95 latency of another caller's predicts sent one after another while the job runs, next
  to the same predicts on the idle server (the ratio is the target: <= 3x);
- **abandoned**: the job's client disconnects; seconds until the model's worker is free
  (``GET /v1/models/resnet50`` says no long job runs; the target: <= 1 s).

A second table weighs the work slice (``GRADCAM_WORK_SLICE_MS``, one server per value): the
predicts' p95 while Score-CAM at ``layer4`` runs, against the seconds a Score-CAM at ``layer2``
(512 passes) takes alone, start to answer (what the slicing costs the long job itself).

Usage (from the repository root, in the project's venv):
    python bench/freeze_bench.py --output bench/results/freeze_cpu.md [--slices 50 100 250]
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import emit, jpeg, running_service  # noqa: E402

MODEL = {"name": "resnet50", "architecture": "resnet50", "weights": "random"}
SCORES = ["confidence_change", "drop", "increase", "road", "deletion", "insertion"]
JOBS: dict[str, dict[str, object]] = {
    "Score-CAM, layer4 (2048 passes)": {"method": "scorecam", "layer": "layer4"},
    "Grad-CAM + all six scores, 10 maps (1170 passes)": {
        "scores": SCORES,
        "curve_step": 0.02,
        "road_percentiles": [10, 20, 30, 40, 50, 60, 70, 80, 90],
        "top_k": 5,
        "layer": ["layer3", "layer4"],
    },
}


@contextmanager
def server(device: str, **settings: str) -> Iterator[str]:
    with running_service(device, [MODEL], **settings) as (base, _):
        yield base


async def predicts(base: str, image: bytes, count: int) -> list[float]:
    """Seconds of ``count`` predicts sent one after another, each on its own connection."""
    latencies = []
    async with httpx.AsyncClient(timeout=120.0) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = await client.post(
                f"{base}/v1/models/resnet50/predict",
                files={"image": ("x.jpg", image, "image/jpeg")},
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


async def long_running(base: str) -> int:
    async with httpx.AsyncClient(timeout=10.0) as client:
        work = (await client.get(f"{base}/v1/models/resnet50")).json()["work"]
        return int(work["long_jobs_running"])


async def explain_once(base: str, image: bytes, job: dict[str, object]) -> tuple[int, float, str]:
    """One explain of ``job``, alone: (status, seconds, the problem's detail if refused)."""
    async with httpx.AsyncClient(timeout=600.0) as client:
        started = time.perf_counter()
        response = await client.post(
            f"{base}/v1/models/resnet50/explain",
            files={"image": ("x.jpg", image, "image/jpeg")},
            data=form(job),
        )
        seconds = time.perf_counter() - started
        detail = "" if response.is_success else response.json().get("detail", "")
        return response.status_code, seconds, detail


async def during(
    base: str, image: bytes, job: dict[str, object], count: int
) -> tuple[list[float], float]:
    """Predict latencies while ``job`` runs, then the seconds from its client leaving to the
    worker being free."""

    task = asyncio.create_task(explain_once(base, image, job))
    deadline = time.monotonic() + 60
    while await long_running(base) == 0:
        if time.monotonic() > deadline or task.done():
            raise RuntimeError("the long job did not start")
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    latencies = await predicts(base, image, count)
    if task.done():
        raise RuntimeError("the long job ended before the predicts did: lengthen it")
    task.cancel()  # the client goes away: its connection is closed
    left = time.perf_counter()
    while await long_running(base):
        await asyncio.sleep(0.02)
    return latencies, time.perf_counter() - left


def form(job: dict[str, object]) -> dict[str, object]:
    data: dict[str, object] = {"overlay": "none"}
    data.update(job)
    return data


async def slices(device: str, count: int, values: list[float], image: bytes) -> str:
    heavy = JOBS["Score-CAM, layer4 (2048 passes)"]
    short = {"method": "scorecam", "layer": "layer2"}
    rows = []
    for value in values:
        with server(
            device,
            request_timeout_s="600",
            max_queue_wait_ms="600000",
            work_slice_ms=f"{value:g}",
        ) as base:
            await predicts(base, image, 3)
            idle = await predicts(base, image, count)
            busy, _ = await during(base, image, heavy, count)
            status, seconds, detail = await explain_once(base, image, short)
            assert status == 200, detail
            rows.append(
                f"| {value:g} | {ms(idle, 95):.0f} | {ms(busy, 50):.0f} / {ms(busy, 95):.0f}"
                f" | {ms(busy, 95) / ms(idle, 95):.2f}x | {seconds:.1f} s |"
            )
    header = (
        "\n\nThe work slice (GRADCAM_WORK_SLICE_MS), one server each:\n\n"
        "| slice (ms) | predict p95 idle (ms) | predict p50 / p95 during Score-CAM layer4 (ms)"
        " | p95 ratio | Score-CAM layer2 alone (512 passes) |\n"
        "|---:|---:|---:|---:|---:|"
    )
    return header + "\n" + "\n".join(rows)


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0


async def measure(device: str, count: int, values: list[float]) -> str:
    image = jpeg(1)
    rows = []
    with server(device) as base:
        refusals = {name: await explain_once(base, image, job) for name, job in JOBS.items()}
    with server(device, request_timeout_s="600", max_queue_wait_ms="600000") as base:
        await predicts(base, image, 3)  # warm
        idle = await predicts(base, image, count)
        for name, job in JOBS.items():
            busy, freed = await during(base, image, job, count)
            status, seconds, detail = refusals[name]
            rows.append(
                f"| {name} | {status} in {seconds * 1000:.0f} ms"
                f" | {ms(idle, 50):.0f} / {ms(idle, 95):.0f}"
                f" | {ms(busy, 50):.0f} / {ms(busy, 95):.0f} | {ms(busy, 95) / ms(idle, 95):.2f}x"
                f" | {freed:.2f} s |"
            )
            print(f"{name}: default server said {status}: {detail}")
    header = (
        f"Long jobs on resnet50 ({device}, {platform.processor() or platform.machine()},"
        f" {os.cpu_count()} cores), {count} predicts each, one at a time, from another client.\n\n"
        "| long job | on the default server (60 s deadline) | predict p50 / p95 idle (ms)"
        " | predict p50 / p95 while it runs (ms) | p95 ratio | abandoned -> worker free |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    table = header + "\n" + "\n".join(rows)
    if values:
        table += await slices(device, count, values, image)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--slices", type=float, nargs="*", default=[], help="work slices (ms) to compare"
    )
    args = parser.parse_args()
    emit(asyncio.run(measure(args.device, args.count, args.slices)), args.output)


if __name__ == "__main__":
    main()
