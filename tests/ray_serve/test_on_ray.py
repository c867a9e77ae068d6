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
from service.config import Settings

SCRIPT = Path(sys.executable).parent / "gradcam-service"
LABELS = ["cat", "dog", "bird", "fish"]
KWARGS = {"channels": [8, 16, 16, 16], "stem_width": 8}
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
        "preprocessing": {"input_size": [64, 64], "crop_pct": 1.0},
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


def test_two_replicas_answer_concurrent_explains_in_batches_with_the_single_process_maps(
    tmp_path: Path,
    models_file: Path,
    single_process_maps: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    run = uuid.uuid4().hex
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADCAM_", "RAY_"))} | {
        MARKER: run,
        "GRADCAM_PORT": str(port),
        "GRADCAM_DEVICE": "cpu",
        "GRADCAM_MODELS_FILE": str(models_file),
        "GRADCAM_CPU_WORKERS": "1",
        "GRADCAM_MAX_BATCH_WAIT_MS": "20",
        "GRADCAM_GRACEFUL_SHUTDOWN_S": "10",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    command = [str(SCRIPT), "ray", "--replicas", "2", "--num-cpus", "2", "--object-store-mb", "100"]
    log = (tmp_path / "ray.log").open("w+")
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read()[-6000:]

    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the command exited early:\n{output()}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in 120 s:\n{output()}"
            time.sleep(0.2)
        started = _marked(run)
        assert len(started) >= 4, "the driver, Ray's own processes and 2 replicas carry the marker"

        images = [_png(seed) for seed in range(IMAGES)]
        answers = asyncio.run(_explain_concurrently(base, images))

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
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            text = output()
            log.close()
    assert code == 0, text
    deadline = time.monotonic() + 10
    while (left := _marked(run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"
    assert "Traceback" not in text, text
