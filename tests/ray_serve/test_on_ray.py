"""``gradcam-service ray`` for real: a local Ray on loopback (usage statistics off, no dashboard,
2 CPUs, a 100 MB object store), 2 replicas, concurrent explain requests, SIGTERM.

The replicas and a single-process app load the same weights, written here (a small ResNet with
random initialisation, as safetensors), so their maps must agree.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.settings import Settings

SCRIPT = Path(sys.executable).parent / "gradcam-service"
LABELS = ["cat", "dog", "bird", "fish"]
#: Wide enough that an image takes tens of milliseconds: requests arriving while a batch computes
#: queue up, so the next batch holds several (a tinier model is done before the next arrives).
KWARGS = {"channels": [32, 64, 128, 256], "stem_width": 32}
SIZE = 128
IMAGES = 8
REQUESTS = 48
CONCURRENCY = 16
#: Marks every process the command starts (Ray passes its environment down to its workers).
MARKER = "GRADCAM_TEST_RAY_RUN"

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not SCRIPT.is_file(), reason="gradcam-service is not installed"),
]
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")


def _png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((60, 80, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _marked(run: str) -> list[int]:
    """Processes whose environment carries ``MARKER=run``: what the command started."""
    needle = f"{MARKER}={run}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
    return found


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("ray-models")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = timm.create_model("resnet18", num_classes=len(LABELS), **KWARGS)
    save_file(model.state_dict(), folder / "small.safetensors")
    entry = {
        "name": "small",
        "architecture": "resnet18",
        "num_classes": len(LABELS),
        "weights": "small.safetensors",
        "labels": LABELS,
        "preprocessing": {"input_size": [SIZE, SIZE], "crop_pct": 1.0},
        "model_kwargs": KWARGS,
    }
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}), encoding="utf-8")
    return path


def _maps(answer: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities of the top classes, heatmap) of a one-image explain answer."""
    (result,) = answer["results"]
    (explanation,) = result["explanations"]
    heatmap = explanation["heatmap"]
    grid = np.frombuffer(base64.b64decode(heatmap["data"]), dtype="<f4").reshape(heatmap["shape"])
    probabilities = np.array([p["probability"] for p in result["predictions"]])
    return probabilities, grid


FORM = {"encoding": "base64", "overlay": "none", "target": "dog", "top_k": "4"}


@pytest.fixture(scope="module")
def single_process_maps(models_file: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each image's answer from the single-process app, one request at a time."""
    settings = Settings(models_file=models_file, device="cpu", cpu_workers=1)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        answers = []
        for seed in range(IMAGES):
            files = {"image": ("x.png", _png(seed), "image/png")}
            response = client.post("/v1/models/small/explain", files=files, data=FORM)
            assert response.status_code == 200, response.text
            answers.append(_maps(response.json()))
    return answers


async def _explain_concurrently(base: str, images: list[bytes]) -> list[tuple[int, httpx.Response]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one(i: int) -> tuple[int, httpx.Response]:
            async with limit:
                files = {"image": ("x.png", images[i % IMAGES], "image/png")}
                return i % IMAGES, await client.post(
                    "/v1/models/small/explain", files=files, data=FORM
                )

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


@dataclass
class RayCommand:
    """``gradcam-service ray`` as a test started it: its process, URL and output."""

    process: subprocess.Popen[str]
    base: str
    run: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"it exited early:\n{self.output()[-6000:]}"
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {timeout:g} s:\n{self.output()}"
            time.sleep(0.2)

    def left_behind(self, grace: float = 10.0) -> list[int]:
        """Processes it started that are still there ``grace`` seconds after it exited."""
        deadline = time.monotonic() + grace
        while (left := _marked(self.run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


@contextmanager
def ray_command(tmp_path: Path, models_file: Path, *options: str) -> Iterator[RayCommand]:
    """Start the command on a local Ray of 2 CPUs and a 100 MB object store; SIGTERM it at the
    end if it still runs (SIGKILL to its whole session if that does not stop it)."""
    run = uuid.uuid4().hex
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADCAM_", "RAY_"))} | {
        MARKER: run,
        "GRADCAM_PORT": str(port),
        "GRADCAM_DEVICE": "cpu",
        "GRADCAM_MODELS_FILE": str(models_file),
        "GRADCAM_CPU_WORKERS": "1",
        "GRADCAM_MAX_BATCH_WAIT_MS": "20",
        "GRADCAM_GRACEFUL_SHUTDOWN_S": "10",
    }
    command = [str(SCRIPT), "ray", *options, "--num-cpus", "2", "--object-store-mb", "100"]
    log = tmp_path / "ray.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            yield RayCommand(process, f"http://127.0.0.1:{port}", run, log)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise


def test_two_replicas_answer_concurrent_explains_in_batches_with_the_single_process_maps(
    tmp_path: Path,
    models_file: Path,
    single_process_maps: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    with ray_command(tmp_path, models_file, "--replicas", "2") as command:
        command.wait_ready()
        started = _marked(command.run)
        assert len(started) >= 4, "the driver, Ray's own processes and 2 replicas carry the marker"

        images = [_png(seed) for seed in range(IMAGES)]
        answers = asyncio.run(_explain_concurrently(command.base, images))

        failed = [(r.status_code, r.text[:300]) for _, r in answers if r.status_code != 200]
        assert not failed, failed
        replicas = {r.headers["x-gradcam-replica"] for _, r in answers}
        assert len(replicas) == 2, replicas
        assert all(name.startswith("GradCam#") for name in replicas), replicas
        sizes = [r.json()["results"][0]["timings"]["batch_size"] for _, r in answers]
        assert max(sizes) > 1, f"no batch of more than one image formed: {sizes}"
        for index, response in answers:
            probabilities, heatmap = _maps(response.json())
            expected_probabilities, expected_heatmap = single_process_maps[index]
            assert heatmap.max() > 0.99, "a map normalised to [0, 1], not an empty one"
            np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
            np.testing.assert_allclose(heatmap, expected_heatmap, atol=1e-4)
    output = command.output()
    assert command.process.returncode == 0, output[-6000:]
    assert command.left_behind() == [], "SIGTERM must stop every process it started"
    assert "Traceback" not in output, output[-6000:]


def test_a_model_that_does_not_load_fails_the_command_with_its_reason(
    tmp_path: Path, models_file: Path
) -> None:
    broken = tmp_path / "models.yaml"
    entries = yaml.safe_load(models_file.read_text(encoding="utf-8"))
    entries["models"][0]["weights"] = str(models_file.parent / "missing.safetensors")
    broken.write_text(yaml.safe_dump(entries), encoding="utf-8")
    with ray_command(tmp_path, broken, "--replicas", "1") as command:
        code = command.process.wait(timeout=120)
    assert code == 1, command.output()[-6000:]
    (line,) = [x for x in command.output().splitlines() if "did not start" in x]
    assert "missing.safetensors" in line, line
    assert command.left_behind() == []
