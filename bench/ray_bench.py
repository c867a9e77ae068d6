"""Scale-out benchmark: the service on Ray Serve with 1 and 2 replicas, next to the single process.

Explain over HTTP on loopback (resnet50 with random weights, 224x224 JPEG uploads, the defaults a
frontend gets) at concurrency 8 and 32: successful requests/s, p50 and p99 of successful
requests, failing statuses, and how many replicas answered (``X-Gradcam-Replica``). Each system
is started, measured and stopped in turn on the same machine, with the same total CPUs:

- ``single``: ``gradcam-service``, one process;
- ``ray xN``: ``gradcam-service ray --replicas N`` on a local Ray of ``--num-cpus`` CPUs, each
  replica reserving ``num-cpus / N`` of them (so torch runs as many threads in total).

Usage (from the repository root, in the project's venv with the ``ray`` and ``bench`` extras):
    python bench/ray_bench.py --output bench/results/ray_cpu.md
All traffic goes to 127.0.0.1; every loop is bounded by a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import emit, free_port, jpeg, stop, wait_ready  # noqa: E402

MODEL = {"name": "resnet50", "architecture": "resnet50", "weights": "random"}
SCRIPT = Path(sys.executable).with_name("gradcam-service")


@dataclass
class Level:
    system: str
    concurrency: int
    requests: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # successful requests only
    statuses: dict[int, int] = field(default_factory=dict)
    replicas: set[str] = field(default_factory=set)
    batch_sizes: list[int] = field(default_factory=list)
    load: float = 0.0  # the machine's 1-minute load average as the level started

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies) * 1000.0, q))

    def failures(self) -> str:
        bad = {k: v for k, v in sorted(self.statuses.items()) if k != 200}
        return ", ".join(f"{v}x{k or 'conn'}" for k, v in bad.items()) or "-"


async def measure(url: str, images: list[bytes], level: Level) -> None:
    """``level.requests`` explain requests from ``level.concurrency`` closed-loop clients."""
    counter = iter(range(level.requests))
    limits = httpx.Limits(max_connections=level.concurrency)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                files = {"image": (f"img{i}.jpg", images[i % len(images)], "image/jpeg")}
                started = time.perf_counter()
                try:
                    response = await client.post(url, files=files)
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                level.statuses[status] = level.statuses.get(status, 0) + 1
                if status == 200:
                    level.latencies.append(time.perf_counter() - started)
                    level.replicas.add(response.headers.get("x-gradcam-replica", "?"))
                    timings = response.json()["results"][0]["timings"]
                    level.batch_sizes.append(int(timings["batch_size"]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(level.concurrency)))
        level.seconds = time.perf_counter() - started


def run_system(
    system: str,
    command: Sequence[str],
    env: dict[str, str],
    images: list[bytes],
    levels: list[int],
    per_client: int,
) -> list[Level]:
    port = int(env["GRADCAM_PORT"])
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/models/resnet50/explain"
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rows = []
    try:
        wait_ready(base, process)
        print(f"{system}: ready in {time.perf_counter() - started:.1f} s", flush=True)
        # Warm-up: oneDNN and the allocator see every batch size before anything is measured.
        asyncio.run(measure(url, images, Level(system, max(levels), 4 * max(levels))))
        for concurrency in levels:
            level = Level(system, concurrency, per_client * concurrency)
            level.load = os.getloadavg()[0]
            asyncio.run(measure(url, images, level))
            print(
                f"  c={concurrency:<3d} {level.rps:6.2f} req/s p50 {level.pct(50):7.1f} ms"
                f" p99 {level.pct(99):7.1f} ms failed {level.failures()}"
                f" replicas {len(level.replicas)}",
                flush=True,
            )
            rows.append(level)
    finally:
        stop(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--per-client", type=int, default=12, help="requests per client")
    parser.add_argument("--batch", type=int, default=8, help="GRADCAM_MAX_BATCH_SIZE")
    parser.add_argument("--skip-single", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    images = [jpeg(seed) for seed in range(16)]
    common = {k: v for k, v in os.environ.items() if not k.startswith("GRADCAM_")} | {
        "GRADCAM_DEVICE": "cpu",
        "GRADCAM_MODELS": json.dumps([MODEL]),
        "GRADCAM_MAX_BATCH_SIZE": str(args.batch),
        "GRADCAM_LOG_LEVEL": "warning",
        # Closed-loop clients resend at once when refused, so admission would turn a slow
        # moment into a burst of 429s that use up the requests: measure capacity instead.
        "GRADCAM_MAX_QUEUE_WAIT_MS": "600000",
        "GRADCAM_MAX_QUEUE_SIZE": "256",
        "GRADCAM_MAX_QUEUED_PER_CALLER": "256",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    rows: list[Level] = []
    if not args.skip_single:
        env = common | {"GRADCAM_PORT": str(free_port())}
        rows += run_system("single", [str(SCRIPT)], env, images, args.levels, args.per_client)
    for replicas in args.replicas:
        env = common | {
            "GRADCAM_PORT": str(free_port()),
            "GRADCAM_RAY_CPUS_PER_REPLICA": f"{args.num_cpus / replicas:g}",
        }
        command = [str(SCRIPT), "ray", "--replicas", str(replicas)]
        command += ["--num-cpus", str(args.num_cpus), "--object-store-mb", "500"]
        rows += run_system(f"ray x{replicas}", command, env, images, args.levels, args.per_client)

    lines = [
        f"Scale-out benchmark, {time.strftime('%Y-%m-%d')}, device cpu, {os.cpu_count()} CPUs"
        f" ({platform.processor() or platform.machine()}), torch {torch.__version__},"
        f" Python {platform.python_version()}",
        f"Command: python bench/ray_bench.py {' '.join(sys.argv[1:])}",
        "",
        f"Explain, resnet50 (random weights), 224x224 JPEG, batch {args.batch}; Ray: a local"
        f" cluster of {args.num_cpus} CPUs, each replica reserving its share. req/s counts"
        " successful requests; p50/p99 over successful requests; 'replicas' answered"
        " (X-Gradcam-Replica); 'batch' is the mean images per device batch; 'load' the"
        " machine's 1-minute load average as the level started (other work on its cores)."
        " Admission by predicted wait is lifted (GRADCAM_MAX_QUEUE_WAIT_MS=600000): closed-loop"
        " clients measure capacity, not overload.",
        "",
        "| system | concurrency | requests | ok req/s | p50 ms | p99 ms | failed | replicas |"
        " batch | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        batch = float(np.mean(r.batch_sizes)) if r.batch_sizes else float("nan")
        lines.append(
            f"| {r.system} | {r.concurrency} | {r.requests} | {r.rps:.2f} | {r.pct(50):.1f} |"
            f" {r.pct(99):.1f} | {r.failures()} | {len(r.replicas)} | {batch:.1f} |"
            f" {r.load:.1f} |"
        )
    emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
