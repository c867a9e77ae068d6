"""Scale-out benchmark: the service on Ray Serve with 1 and 2 replicas, next to the single process.

Explain over HTTP on loopback (resnet50 with random weights, 224x224 JPEG uploads, the defaults a
frontend gets) at concurrency 8 and 32: successful requests/s, p50 and p99 of successful
requests, failing statuses, and how many replicas answered (``X-Gradcam-Replica``). Every system
runs at once and they are measured in turn, in interleaved rounds, so that other work on the
machine falls on all of them alike; each has the same CPUs:

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
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import (  # noqa: E402
    emit,
    failure_summary,
    free_port,
    jpeg,
    load,
    percentile_ms,
    stop,
    wait_ready,
)

MODEL = {"name": "resnet50", "architecture": "resnet50", "weights": "random"}
SCRIPT = Path(sys.executable).with_name("gradcam-service")


@dataclass
class Level:
    """One system at one concurrency, pooled over the rounds."""

    system: str
    concurrency: int
    requests: int = 0
    rates: list[float] = field(default_factory=list)  # successful req/s of each round
    latencies: list[float] = field(default_factory=list)  # successful requests only
    statuses: dict[int, int] = field(default_factory=dict)
    replicas: set[str] = field(default_factory=set)
    batch_sizes: list[int] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # 1-minute load average at each round

    @property
    def rps(self) -> float:
        """The median over the rounds of successful requests/s."""
        return statistics.median(self.rates) if self.rates else 0.0

    def pct(self, q: float) -> float:
        return percentile_ms(self.latencies, q)

    def failures(self) -> str:
        return failure_summary(self.statuses)


async def measure(url: str, images: list[bytes], level: Level, requests: int) -> None:
    """``requests`` explain requests from ``level.concurrency`` closed-loop clients, added to
    ``level`` as one round."""

    def answered(response: httpx.Response) -> None:
        level.replicas.add(response.headers.get("x-gradcam-replica", "?"))
        level.batch_sizes.append(int(response.json()["results"][0]["timings"]["batch_size"]))

    seconds, latencies, _, statuses = await load(
        url, images, level.concurrency, requests, {}, on_ok=answered
    )
    level.rates.append(len(latencies) / seconds)
    level.latencies += latencies
    for status, count in statuses.items():
        level.statuses[status] = level.statuses.get(status, 0) + count
    level.requests += requests


@dataclass
class System:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['GRADCAM_PORT']}/v1/models/resnet50/explain"

    def start(self) -> None:
        started = time.perf_counter()
        quiet = subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=ROOT, stdout=quiet, stderr=quiet
        )
        wait_ready(self.url.split("/v1/")[0], self.process)
        print(f"{self.name}: ready in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cpu", help="GRADCAM_DEVICE; on GPUs each replica takes one"
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=4, help="requests per client a round")
    parser.add_argument("--batch", type=int, default=8, help="GRADCAM_MAX_BATCH_SIZE")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    images = [jpeg(seed) for seed in range(16)]
    common = {k: v for k, v in os.environ.items() if not k.startswith("GRADCAM_")} | {
        "GRADCAM_DEVICE": args.device,
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
    systems = [System("single", [str(SCRIPT)], common | {"GRADCAM_PORT": str(free_port())})]
    for replicas in args.replicas:
        env = common | {
            "GRADCAM_PORT": str(free_port()),
            "GRADCAM_RAY_CPUS_PER_REPLICA": f"{args.num_cpus / replicas:g}",
        }
        command = [str(SCRIPT), "ray", "--replicas", str(replicas)]
        command += ["--num-cpus", str(args.num_cpus), "--object-store-mb", "500"]
        systems.append(System(f"ray x{replicas}", command, env))

    levels = {(s.name, c): Level(s.name, c) for s in systems for c in args.levels}
    try:
        for system in systems:
            system.start()
            # Warm-up: oneDNN and the allocator see every batch size before anything counts.
            warm = Level(system.name, max(args.levels))
            asyncio.run(measure(system.url, images, warm, 4 * max(args.levels)))
        # Rounds interleave the systems, so that other work on the machine falls on all alike.
        for round_ in range(args.rounds):
            for concurrency in args.levels:
                for system in systems:
                    level = levels[(system.name, concurrency)]
                    level.loads.append(os.getloadavg()[0])
                    asyncio.run(measure(system.url, images, level, args.per_client * concurrency))
                    print(
                        f"round {round_ + 1} {system.name:7s} c={concurrency:<3d}"
                        f" {level.rates[-1]:6.2f} req/s failed {level.failures()}",
                        flush=True,
                    )
    finally:
        for system in systems:
            if system.process is not None:
                stop(system.process)

    lines = [
        f"Scale-out benchmark, {time.strftime('%Y-%m-%d')}, device {args.device},"
        f" {os.cpu_count()} CPUs"
        f" ({platform.processor() or platform.machine()}), torch {torch.__version__},"
        f" Python {platform.python_version()}",
        f"Command: python bench/ray_bench.py {' '.join(sys.argv[1:])}",
        "",
        f"Explain, resnet50 (random weights), 224x224 JPEG, batch {args.batch}; Ray: a local"
        f" cluster of {args.num_cpus} CPUs per Ray system, each replica reserving its share. All"
        f" systems run at once and are measured in turn, {args.rounds} interleaved rounds of"
        f" {args.per_client} requests per client. req/s: median over the rounds of successful"
        " requests/s; p50/p99 over every successful request of the rounds; 'replicas' that"
        " answered (X-Gradcam-Replica); 'batch': mean images per device batch; 'load': the"
        " machine's 1-minute load average at the rounds (median; other work on its cores)."
        " Admission by predicted wait is lifted (GRADCAM_MAX_QUEUE_WAIT_MS=600000): closed-loop"
        " clients measure capacity, not overload.",
        "",
        "| system | concurrency | requests | ok req/s | req/s by round | p50 ms | p99 ms | failed |"
        " replicas | batch | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency in args.levels:
        for system in systems:
            r = levels[(system.name, concurrency)]
            batch = float(np.mean(r.batch_sizes)) if r.batch_sizes else float("nan")
            rounds = " / ".join(f"{rate:.1f}" for rate in r.rates)
            lines.append(
                f"| {r.system} | {r.concurrency} | {r.requests} | {r.rps:.2f} | {rounds} |"
                f" {r.pct(50):.1f} | {r.pct(99):.1f} | {r.failures()} | {len(r.replicas)} |"
                f" {batch:.1f} | {statistics.median(r.loads):.1f} |"
            )
    emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
