"""Latency benchmark: overhead per request, phone-sized photos, and overload, side by side.

Prints one markdown table (and writes it with ``--output``). In one run, with the real server
(``gradcam-service``, resnet50 with random weights) over HTTP on loopback:

- **overhead**: explain at concurrency 1 over HTTP (p50) next to the engine's in-process
  explain of one preprocessed image, and explain throughput at concurrency 8 next to the
  in-process batched ceiling;
- **photos**: end-to-end explain of a 12-megapixel phone JPEG (4032x3024) and of a 320x240
  JPEG at concurrency 1, on the default server (reduced decoding) and on one started with
  ``GRADCAM_EXACT_DECODE=true`` (every pixel decoded, as before);
- **overload**: open-loop arrivals at twice the measured capacity for ``--overload-s`` seconds:
  offered rate, accepted p50/p99, goodput, share of 429s, other failures, resident memory, on
  the default server (``GRADCAM_MAX_QUEUE_WAIT_MS=2000``) and on one whose time bound is
  effectively off (the image-count bound only, as before).

Usage (from the repository root, in the project's venv with the ``bench`` extra):
    python bench/latency_bench.py --output bench/results/latency_cpu.md
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import (  # noqa: E402
    emit,
    explain_seconds,
    jpeg,
    load,
    rss_mb,
    running_service,
)

MODEL = {"name": "resnet50", "architecture": "resnet50", "weights": "random"}


def photo(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients, soft edges and sensor noise, quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
    for _ in range(6):  # a few soft blobs
        cx, cy, r = rng.random() * width, rng.random() * height, (0.05 + rng.random() * 0.2) * width
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        base = base * (1 - 0.6 * blob) + 0.6 * blob * rng.random(3) * 255
    noisy = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    picture = Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(1))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@contextmanager
def server(
    device: str, batch: int, **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The README's server on a free port with resnet50; yields (base URL, process)."""
    with running_service(
        device,
        [MODEL],
        max_batch_size=str(batch),
        max_upload_bytes=str(64 * 1024 * 1024),
        **settings,
    ) as served:
        yield served


def in_process(device: str, batch: int, repeats: int) -> tuple[float, float]:
    """(ms for one image, images/s at ``batch``): engine explain of preprocessed tensors."""
    from service.engine.loading import load_model
    from service.engine.models.spec import ModelSpec

    model = load_model(ModelSpec.model_validate(MODEL), torch.device(device))
    one = explain_seconds(model, 1, repeats)
    return one * 1000.0, batch / explain_seconds(model, batch, repeats)


def p(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000.0, q)) if latencies else float("nan")


@dataclass
class Overload:
    label: str
    offered_rps: float
    seconds: float
    statuses: dict[int, int] = field(default_factory=dict)
    accepted: list[float] = field(default_factory=list)  # latencies of 200s
    rss_before: float = 0.0
    rss_after: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def share(self, status: int) -> float:
        return self.statuses.get(status, 0) / max(1, self.sent)

    def others(self) -> str:
        bad = {k: v for k, v in sorted(self.statuses.items()) if k not in (200, 429)}
        return ", ".join(f"{v}x{k or 'conn'}" for k, v in bad.items()) or "-"


async def open_loop(url: str, image: bytes, rate: float, seconds: float, result: Overload) -> None:
    """Send one request every 1/rate s for ``seconds``, whatever the answers (open loop)."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:

        async def one(index: int) -> None:
            files = {"image": (f"{index}.jpg", image, "image/jpeg")}
            started = time.perf_counter()
            try:
                status = (await client.post(url, files=files)).status_code
            except httpx.HTTPError:
                status = 0
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.accepted.append(time.perf_counter() - started)

        tasks = []
        start = time.perf_counter()
        index = 0
        while (due := start + index / rate) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(index)))
            index += 1
        await asyncio.gather(*tasks)


def c1_latencies(url: str, image: bytes, count: int) -> list[float]:
    asyncio.run(load(url, [image], 1, 3, {}))  # warm-up
    _, latencies, errors, statuses = asyncio.run(load(url, [image], 1, count, {}))
    if errors:
        raise RuntimeError(f"errors at concurrency 1: {statuses}")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8, help="server max batch size")
    parser.add_argument("--requests", type=int, default=30, help="requests per c=1 row")
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = (
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    small, big = jpeg(0), photo(4032, 3024)
    phone_small = photo(320, 240, seed=1)
    lines: list[str] = []

    print("in-process ...", flush=True)
    one_ms, ceiling = in_process(device, args.batch, repeats=15)
    print(f"  one image {one_ms:.1f} ms, batch {args.batch} {ceiling:.2f} images/s", flush=True)

    with server(device, args.batch) as (base, process):
        url = f"{base}/v1/models/resnet50/explain"
        print("overhead ...", flush=True)
        c1 = c1_latencies(url, small, args.requests)
        asyncio.run(load(url, [small], 8, 16, {}))  # warm-up of every batch size
        seconds, _, errors, _ = asyncio.run(load(url, [small], 8, 12 * 8 * 2, {}))
        c8_rps = (12 * 8 * 2 - errors) / seconds
        print(f"  c=1 p50 {p(c1, 50):.1f} ms, c=8 {c8_rps:.2f} req/s", flush=True)
        print("photos ...", flush=True)
        photos = {
            "reduced": (
                c1_latencies(url, big, args.requests),
                c1_latencies(url, phone_small, args.requests),
            )
        }
        # Capacity for the overload: closed-loop at c=16 for about as long as the overload runs
        # (a short c=8 run varies too much between runs on a shared machine).
        total = max(64, int(c8_rps * args.overload_s * 0.75))
        seconds, _, errors, _ = asyncio.run(load(url, [small], 16, total, {}))
        capacity = (total - errors) / seconds
        print(f"overload at 2 x {capacity:.2f} req/s ...", flush=True)
        bounded = Overload("time-bounded (2000 ms, default)", 2 * capacity, args.overload_s)
        bounded.rss_before = rss_mb(process.pid)
        asyncio.run(open_loop(url, small, 2 * capacity, args.overload_s, bounded))
        bounded.rss_after = rss_mb(process.pid)
        batch_ms = 1000.0 * args.batch / capacity

    with server(device, args.batch, exact_decode="true") as (base, _):
        url = f"{base}/v1/models/resnet50/explain"
        print("photos, exact decoding ...", flush=True)
        photos["exact (GRADCAM_EXACT_DECODE)"] = (
            c1_latencies(url, big, args.requests),
            c1_latencies(url, phone_small, args.requests),
        )

    before = {"max_queue_wait_ms": "600000", "max_queued_per_caller": "64"}
    with server(device, args.batch, **before) as (base, process):
        url = f"{base}/v1/models/resnet50/explain"
        print("overload, no time bound ...", flush=True)
        asyncio.run(load(url, [small], 8, 16, {}))
        unbounded = Overload("image count only, 64 (as before)", 2 * capacity, args.overload_s)
        unbounded.rss_before = rss_mb(process.pid)
        asyncio.run(open_loop(url, small, 2 * capacity, args.overload_s, unbounded))
        unbounded.rss_after = rss_mb(process.pid)

    lines += [
        f"Latency benchmark, {time.strftime('%Y-%m-%d')}, device {device}, {os.cpu_count()} CPUs,"
        f" torch {torch.__version__}, Python {platform.python_version()}",
        f"Command: python bench/latency_bench.py {' '.join(sys.argv[1:])}",
        "",
        "Overhead per request (resnet50 layer4, 224x224 JPEG, default answer: raw heatmap as a"
        " list and a PNG overlay):",
        "",
        "| measure | in-process | over HTTP | ratio | target |",
        "|---|---|---|---|---|",
        f"| explain one image, c=1 (p50 ms) | {one_ms:.1f} | {p(c1, 50):.1f} |"
        f" {p(c1, 50) / one_ms:.2f}x | <= 1.25x |",
        f"| explain throughput, c=8 (images/s) | {ceiling:.2f} | {c8_rps:.2f} |"
        f" {c8_rps / ceiling:.0%} | >= 85% |",
        "",
        f"Photos, end to end at c=1 over {args.requests} requests each (explain, default answer):",
        "",
        "| decoding | 4032x3024 JPEG p50 ms | 320x240 JPEG p50 ms | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for name, (large, little) in photos.items():
        lines.append(
            f"| {name} | {p(large, 50):.1f} | {p(little, 50):.1f} |"
            f" {p(large, 50) / p(little, 50):.2f}x | <= 1.5x |"
        )
    lines += [
        "",
        f"Overload: open-loop arrivals at 2x capacity ({2 * capacity:.1f} req/s; capacity ="
        f" explain closed-loop at c=16, {capacity:.2f} req/s; one batch of {args.batch} about"
        f" {batch_ms:.0f} ms) for {args.overload_s:g} s, one 224x224 JPEG per request:",
        "",
        "| admission | sent | accepted p50 ms | accepted p99 ms | goodput req/s (of capacity)"
        " | 429 | other failures | RSS before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in (bounded, unbounded):
        goodput = len(run.accepted) / run.seconds
        lines.append(
            f"| {run.label} | {run.sent} | {p(run.accepted, 50):.0f} | {p(run.accepted, 99):.0f}"
            f" | {goodput:.2f} ({goodput / capacity:.0%}) | {run.share(429):.0%} | {run.others()}"
            f" | {run.rss_before:.0f} -> {run.rss_after:.0f} MB"
            f" ({run.rss_after - run.rss_before:+.0f}) |"
        )
    lines += [
        "",
        f"- target: accepted p99 at most the bound plus one batch ({2000 + batch_ms:.0f} ms),"
        " goodput at least 90% of capacity, no failures but 429, memory growth under 150 MB",
    ]
    emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
