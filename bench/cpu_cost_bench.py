"""The service's own CPU cost per request, against the web framework's floor, in one run.

With a near-free model (``resnet10t`` at a 32x32 input), what a request costs the server is
almost all the service's own work: HTTP, multipart, decoding, preprocessing, admission, futures,
colouring, PNG, JSON. This benchmark measures it as the server process's CPU time (utime +
stime of ``/proc/<pid>/stat``, every thread) over N requests from closed-loop clients, less the
model's own CPU per image measured in process (at the server's batch size), and compares it
with a bare FastAPI + uvicorn endpoint reading the same multipart upload
(``bench/floor_app.py``), measured in the same run and interleaved with the cases, so that
other load on the machine moves both.

Prints one markdown table (and writes it with ``--output``): per case, the median over
``--rounds`` of server CPU ms per request, the model's own ms, the service's own ms, and that
over the floor's.

Usage (from the repository root, in the project's venv with the ``bench`` extra):
    python bench/cpu_cost_bench.py --output bench/results/cpu_cost_cpu.md
All traffic goes to 127.0.0.1; every loop is bounded by a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import ROOT, emit, free_port, load, running_service, stop, wait_ready

TICKS = os.sysconf("SC_CLK_TCK")
MODEL = {
    "name": "tiny",
    "architecture": "resnet10t",
    "weights": "random",
    "preprocessing": {"input_size": [32, 32]},
}


@dataclass(frozen=True)
class Case:
    name: str
    endpoint: str  # "floor", "predict" or "explain"
    size: tuple[int, int]  # (width, height) of the JPEG
    params: dict[str, str] = field(default_factory=dict)


CASES = [
    Case("bare FastAPI + uvicorn, same upload, small JSON (the floor)", "floor", (224, 224)),
    Case("predict, 224x224", "predict", (224, 224)),
    Case("explain, 224x224, default answer (list map + PNG overlay)", "explain", (224, 224)),
    Case("explain, 640x480, default answer", "explain", (640, 480)),
    Case(
        "explain, 224x224, overlay=none, encoding=base64",
        "explain",
        (224, 224),
        {"overlay": "none", "encoding": "base64"},
    ),
]


def photo(seed: int, width: int, height: int) -> bytes:
    """A smooth photo-like JPEG (upsampled noise), about as large as a real one."""
    rng = np.random.default_rng(seed)
    base = rng.random((max(1, height // 8), max(1, width // 8), 3))
    picture = Image.fromarray((base * 255).astype(np.uint8)).resize((width, height))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes ``pids`` (every thread), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15, after pid and comm
    return total / TICKS


def server_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (several serving processes count as one server)."""
    found = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for text in child.read_text().split():
            found += server_pids(int(text))
    return sorted(set(found))


def model_cpu_ms(batch: int, repeats: int) -> dict[str, list[float]]:
    """The near-free model's own CPU ms per image, in process, at each batch size from 1 to
    ``batch``: predict (a forward pass) and explain (Grad-CAM at its default layer). Small
    batches cost more per image, so the server's own mean batch size picks the value."""
    from service.engine.cam.explain import ImageRequest, explain, predict
    from service.engine.loading import load_model
    from service.engine.models.spec import ModelSpec

    model = load_model(ModelSpec.model_validate(MODEL), torch.device("cpu"))

    def per_image(work: Callable[[], object], size: int) -> float:
        work()
        samples = []
        for _ in range(repeats):
            started = time.process_time()
            work()
            samples.append((time.process_time() - started) * 1000 / size)
        return statistics.median(samples)

    table: dict[str, list[float]] = {"predict": [], "explain": [], "floor": []}
    for size in range(1, batch + 1):
        inputs = torch.randn(size, 3, *model.input_size)
        requests = [ImageRequest()] * size
        table["predict"].append(per_image(lambda x=inputs: predict(model, x), size))
        table["explain"].append(per_image(lambda x=inputs, r=requests: explain(model, x, r), size))
        table["floor"].append(0.0)
    return table


def at_batch(table: list[float], mean_batch: float) -> float:
    """The per-image cost at a mean batch size, interpolated between whole sizes."""
    position = min(max(mean_batch, 1.0), float(len(table))) - 1
    low = int(position)
    high = min(low + 1, len(table) - 1)
    return table[low] + (table[high] - table[low]) * (position - low)


def batches_seen(base: str) -> tuple[float, float]:
    """(images, batches) the service has run so far, from its /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    images = batches = 0.0
    for line in text.splitlines():
        if line.startswith("gradcam_batch_size_sum"):
            images += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gradcam_batch_size_count"):
            batches += float(line.rsplit(" ", 1)[1])
    return images, batches


@contextmanager
def floor_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.floor_app:app", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(command, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield base, process
    finally:
        stop(process)


@dataclass(frozen=True)
class Sample:
    cpu_ms: float  # server CPU per successful request
    rps: float
    failures: str
    mean_batch: float  # images per batch the service ran (1 for the floor)


def measure(
    url: str,
    pid: int,
    images: list[bytes],
    params: dict[str, str],
    concurrency: int,
    total: int,
    base: str | None = None,
) -> Sample:
    """Server CPU, throughput and failures over ``total`` requests; ``base``: the service's
    address, to read the batch sizes it ran."""
    pids = server_pids(pid)
    seen = batches_seen(base) if base else (0.0, 0.0)
    before = cpu_seconds(pids)
    seconds, _latencies, errors, statuses = asyncio.run(
        load(url, images, concurrency, total, params)
    )
    used = cpu_seconds(pids) - before
    ok = total - errors
    bad = ", ".join(f"{n}x{s or 'conn'}" for s, n in sorted(statuses.items()) if s != 200)
    mean_batch = 1.0
    if base:
        images_after, batches_after = batches_seen(base)
        ran = batches_after - seen[1]
        mean_batch = (images_after - seen[0]) / ran if ran else 1.0
    return Sample(1000 * used / max(1, ok), ok / seconds, bad or "-", mean_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400, help="per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="server max batch size")
    parser.add_argument("--torch-threads", type=int, default=1, help="the model's, see above")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--service-setting", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.service_setting)

    torch.set_num_threads(args.torch_threads)
    print("the model's own CPU per image, in process ...", flush=True)
    own = model_cpu_ms(args.batch, repeats=20)
    for kind in ("predict", "explain"):
        costs = ", ".join(f"{ms:.2f}" for ms in own[kind])
        print(f"  {kind} ms/image at batch 1..{args.batch}: {costs}", flush=True)
    images = {case.size: [photo(seed, *case.size) for seed in range(8)] for case in CASES}
    samples: dict[str, list[Sample]] = {case.name: [] for case in CASES}
    with (
        floor_server() as (floor_base, floor_process),
        running_service(
            "cpu",
            [MODEL],
            max_batch_size=str(args.batch),
            torch_threads=str(args.torch_threads),
            **settings,
        ) as (base, process),
    ):
        for round_ in range(args.rounds):
            for case in CASES:
                if case.endpoint == "floor":
                    url, pid, service = f"{floor_base}/upload", floor_process.pid, None
                else:
                    url, pid = f"{base}/v1/models/tiny/{case.endpoint}", process.pid
                    service = base
                if round_ == 0:  # warm-up
                    measure(url, pid, images[case.size], case.params, args.concurrency, 64)
                total = args.requests * (5 if case.endpoint == "floor" else 1)  # 10 ms ticks
                result = measure(
                    url, pid, images[case.size], case.params, args.concurrency, total, service
                )
                samples[case.name].append(result)
                print(
                    f"  round {round_ + 1} {case.name[:48]:48s} {result.cpu_ms:7.2f} ms"
                    f" CPU/request {result.rps:7.1f} req/s batch {result.mean_batch:.1f}"
                    f" errors {result.failures}",
                    flush=True,
                )

    floor_ms = statistics.median(s.cpu_ms for s in samples[CASES[0].name])
    rows = []
    for case in CASES:
        runs = samples[case.name]
        cpu = statistics.median(s.cpu_ms for s in runs)
        rps = statistics.median(s.rps for s in runs)
        batch = statistics.median(s.mean_batch for s in runs)
        model = at_batch(own[case.endpoint], batch)
        service = cpu - model
        failures = ", ".join(sorted({s.failures for s in runs} - {"-"})) or "-"
        rows.append(
            f"| {case.name} | {cpu:.2f} | {batch:.1f} | {model:.2f} | {service:.2f}"
            f" | {service / floor_ms:.1f} | {rps:.0f} | {failures} |"
        )
    table = "\n".join(
        [
            f"Server CPU per request, median of {args.rounds} rounds of {args.requests} requests"
            f" ({5 * args.requests} for the floor) at c={args.concurrency} (httpx on the same"
            f" machine); model `resnet10t` at 32x32, random weights, batch up to {args.batch},"
            f" {args.torch_threads} torch thread(s); {platform.machine()}, {os.cpu_count()}"
            f" cores, torch {torch.__version__}, one serving process. The model's own CPU per"
            " image is measured in process at the mean batch size the service ran.",
            "",
            "| request (one JPEG) | server CPU ms/request | mean batch | model's own ms"
            " | service's own ms | x floor | req/s | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            *rows,
        ]
    )
    emit(table, args.output)


if __name__ == "__main__":
    main()
