"""Serving benchmark: the real server over HTTP on loopback, next to a naive baseline.

Prints one markdown table (and writes it with ``--output``):

- in-process ceiling: batched explain throughput of the engine alone (no HTTP, no decoding);
- predict and explain over HTTP at several concurrencies: requests/s, p50, p99, errors, for
  this service and for the naive baseline (``bench/naive_app.py``: one FastAPI endpoint calling
  pytorch-grad-cam per request), measured in the same run;
- resident memory of the server before and after many explain requests.

Usage (from the repository root, in the project's venv with the ``bench`` extra):
    python bench/serve_bench.py --output bench/results/serve_cpu.md
All traffic goes to 127.0.0.1; every loop is bounded by a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from service.engine.models.loaded import LoadedModel

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LevelResult:
    system: str
    endpoint: str
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]  # of successful (200) requests only
    errors: int
    statuses: dict[int, int]

    @property
    def rps(self) -> float:
        """Goodput: successful requests per second."""
        ok = self.requests - self.errors
        return ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return percentile_ms(self.latencies, q)

    def failures(self) -> str:
        return failure_summary(self.statuses)


def percentile_ms(latencies: list[float], q: float) -> float:
    """The ``q``-th percentile of latencies in seconds, in milliseconds (nan for none)."""
    if not latencies:
        return float("nan")
    return float(np.percentile(np.asarray(latencies) * 1000.0, q))


def failure_summary(statuses: dict[int, int]) -> str:
    """The non-200 statuses and their counts, e.g. ``3x429, 1xconn``; ``-`` for none."""
    bad = {k: v for k, v in sorted(statuses.items()) if k != 200}
    return ", ".join(f"{v}x{k or 'conn'}" for k, v in bad.items()) or "-"


def emit(table: str, output: Path | None) -> None:
    """Print a result table, and write it to ``output`` when given."""
    print()
    print(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jpeg(seed: int, size: int = 224) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.random((size // 8, size // 8, 3))
    picture = Image.fromarray((base * 255).astype(np.uint8)).resize((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready in time")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def running_service(
    device: str, models: list[dict[str, object]], **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The README's ``gradcam-service`` on a free port serving ``models`` on ``device``, logs
    at warning, each ``settings`` entry as ``GRADCAM_<KEY>``; yields (base URL, process) once
    ready, and stops it after."""
    port = free_port()
    env = dict(
        os.environ,
        GRADCAM_PORT=str(port),
        GRADCAM_DEVICE=device,
        GRADCAM_MODELS=json.dumps(models),
        GRADCAM_LOG_LEVEL="warning",
        **{f"GRADCAM_{key.upper()}": value for key, value in settings.items()},
    )
    command = [str(Path(sys.executable).with_name("gradcam-service"))]
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield base, process
    finally:
        stop(process)


async def load(
    url: str,
    images: list[bytes],
    concurrency: int,
    total: int,
    params: dict[str, str],
    on_ok: Callable[[httpx.Response], None] | None = None,
) -> tuple[float, list[float], int, dict[int, int]]:
    """``total`` uploads from ``concurrency`` closed-loop clients: (seconds, latencies of the
    successful ones, errors, count by status). ``on_ok`` sees each successful response."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            for i in counter:
                files = {"image": (f"img{i}.jpg", images[i % len(images)], "image/jpeg")}
                started = time.perf_counter()
                try:
                    response = await client.post(url, files=files, data=params)
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                    if on_ok is not None:
                        on_ok(response)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return seconds, latencies, errors, statuses


def run_levels(
    system: str,
    urls: dict[str, str],
    images: list[bytes],
    levels: list[int],
    scale: float,
    params: dict[str, dict[str, str]],
    before_level: Callable[[], None] = lambda: None,
) -> list[LevelResult]:
    results = []
    for endpoint, url in urls.items():
        before_level()
        asyncio.run(load(url, images, 2, 4, params[endpoint]))  # warm-up
        for concurrency in levels:
            before_level()
            total = max(8, int(scale * max(32, 12 * concurrency)))
            seconds, latencies, errors, statuses = asyncio.run(
                load(url, images, concurrency, total, params[endpoint])
            )
            result = LevelResult(
                system, endpoint, concurrency, total, seconds, latencies, errors, statuses
            )
            print(
                f"  {system:8s} {endpoint:8s} c={concurrency:<3d} {result.rps:7.2f} req/s "
                f"p50 {result.pct(50):8.1f} ms p99 {result.pct(99):8.1f} ms errors {errors}",
                flush=True,
            )
            results.append(result)
    return results


def explain_seconds(model: LoadedModel, size: int, repeats: int) -> float:
    """Median seconds of one engine explain of ``size`` preprocessed images at the model's
    default layer (layer4 for a ResNet), after one warm-up call."""
    from service.engine.cam.explain import ImageRequest, explain

    inputs = torch.randn(size, 3, *model.input_size, device=model.device)
    requests = [ImageRequest()] * size
    explain(model, inputs, requests)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        explain(model, inputs, requests)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def engine_ceiling(device: str, batch: int, repeats: int) -> float:
    """Images/s of batched gradcam explain at layer4, engine only."""
    from service.engine.loading import load_model
    from service.engine.models.spec import ModelSpec

    model = load_model(
        ModelSpec(name="resnet50", architecture="resnet50", weights="random"), torch.device(device)
    )
    return batch / explain_seconds(model, batch, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies requests per level")
    parser.add_argument("--memory-requests", type=int, default=2000)
    parser.add_argument(
        "--memory-warmup",
        type=int,
        default=600,
        help="explain requests before the 'before' reading: allocator and oneDNN caches fill up"
        " for every batch size first, then memory must stay flat",
    )
    parser.add_argument("--batch", type=int, default=8, help="server max batch size")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    images = [jpeg(seed) for seed in range(16)]
    print("in-process ceiling ...", flush=True)
    ceiling = engine_ceiling(device, args.batch, repeats=5)
    print(f"  engine explain ceiling: {ceiling:.2f} images/s", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    models = [{"name": "resnet50", "architecture": "resnet50", "weights": "random"}]
    env = dict(
        os.environ,
        GRADCAM_PORT=str(port),
        GRADCAM_DEVICE=device,
        GRADCAM_MODELS=json.dumps(models),
        GRADCAM_MAX_BATCH_SIZE=str(args.batch),
        GRADCAM_LOG_LEVEL="warning",
    )
    command = [str(Path(sys.executable).with_name("gradcam-service"))]
    server = subprocess.Popen(command, env=env, cwd=ROOT)
    rows: list[LevelResult] = []
    try:
        wait_ready(base, server)
        urls = {
            "predict": f"{base}/v1/models/resnet50/predict",
            "explain": f"{base}/v1/models/resnet50/explain",
        }
        params = {"predict": {"top_k": "5"}, "explain": {}}
        rows += run_levels("service", urls, images, args.levels, args.scale, params)
        rss_start = rss_mb(server.pid)
        print(f"memory: warm-up of {args.memory_warmup} explain requests at c=8 ...", flush=True)
        asyncio.run(load(urls["explain"], images, 8, args.memory_warmup, {}))
        rss_before = rss_mb(server.pid)
        print(f"memory: {args.memory_requests} explain requests at c=8 ...", flush=True)
        _seconds, _, mem_errors, _ = asyncio.run(
            load(urls["explain"], images, 8, args.memory_requests, {})
        )
        rss_after = rss_mb(server.pid)
        print(f"  RSS {rss_before:.0f} MB -> {rss_after:.0f} MB, errors {mem_errors}", flush=True)
    finally:
        stop(server)

    naive_crashes = 0
    if not args.skip_naive:
        naive_port = free_port()
        naive_base = f"http://127.0.0.1:{naive_port}"
        naive_env = dict(os.environ, CUDA_VISIBLE_DEVICES="" if device == "cpu" else "0")
        naive_command = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.naive_app:app",
            "--port",
            str(naive_port),
            "--log-level",
            "warning",
        ]
        naive = subprocess.Popen(naive_command, env=naive_env, cwd=ROOT)

        def revive() -> None:
            """The naive server can die under concurrent backward passes: measure each level
            on a live process, and count the crashes."""
            nonlocal naive, naive_crashes
            if naive.poll() is not None:
                naive_crashes += 1
                print(f"  naive server died (exit {naive.returncode}); restarting", flush=True)
                naive = subprocess.Popen(naive_command, env=naive_env, cwd=ROOT)
            wait_ready(naive_base, naive)

        try:
            urls = {"predict": f"{naive_base}/predict", "explain": f"{naive_base}/explain"}
            rows += run_levels(
                "naive",
                urls,
                images,
                args.levels,
                args.scale,
                {"predict": {}, "explain": {}},
                before_level=revive,
            )
            if naive.poll() is not None:
                naive_crashes += 1
        finally:
            stop(naive)

    lines = [
        f"Serving benchmark, {time.strftime('%Y-%m-%d')}, device {device}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}",
        f"Command: python bench/serve_bench.py {' '.join(sys.argv[1:])}",
        "",
        f"In-process ceiling (engine explain, resnet50 layer4, batch {args.batch}): "
        f"{ceiling:.2f} images/s",
        "",
        "req/s counts successful requests only; p50/p99 are over successful requests; 'failed'"
        " gives the non-200 statuses (conn = connection error).",
        "",
        "| system | endpoint | concurrency | requests | ok req/s | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.endpoint} | {r.concurrency} | {r.requests} | {r.rps:.2f} | "
            f"{r.pct(50):.1f} | {r.pct(99):.1f} | {r.failures()} |"
        )
    lines.append("")

    def find(system: str, endpoint: str, concurrency: int) -> LevelResult | None:
        for r in rows:
            if (r.system, r.endpoint, r.concurrency) == (system, endpoint, concurrency):
                return r
        return None

    ours8 = find("service", "explain", 8)
    naive8 = find("naive", "explain", 8)
    ours32 = find("service", "explain", 32)
    naive32 = find("naive", "explain", 32)
    if ours8:
        lines.append(
            f"- explain at c=8 over HTTP / in-process ceiling: {ours8.rps / ceiling:.0%} "
            "(target >= 70%)"
        )
    if ours8 and naive8:
        lines.append(
            f"- explain at c=8, service / naive: {ours8.rps / naive8.rps:.2f}x (target >= 2x)"
        )
    if ours32 and naive32 and naive32.errors:
        lines.append(
            f"- explain at c=32: service p99 {ours32.pct(99):.0f} ms with {ours32.errors} failed;"
            f" naive failed {naive32.errors} of {naive32.requests} ({naive32.failures()})"
        )
    elif ours32 and naive32:
        lines.append(
            f"- explain p99 at c=32: service {ours32.pct(99):.0f} ms vs naive "
            f"{naive32.pct(99):.0f} ms (target: no worse)"
        )
    if naive_crashes:
        lines.append(
            f"- the naive server process died {naive_crashes} time(s) during the run (restarted"
            " before the next level; 'conn' failures are requests sent to the dead process)"
        )
    lines.append(
        f"- resident memory after the load levels {rss_start:.0f} MB, after a warm-up of "
        f"{args.memory_warmup} explain requests {rss_before:.0f} MB"
    )
    lines.append(
        f"- resident memory before/after {args.memory_requests} explain requests: "
        f"{rss_before:.0f} MB -> {rss_after:.0f} MB ({rss_after - rss_before:+.0f} MB, "
        f"target < 50 MB growth), {mem_errors} errors"
    )
    emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
