"""The README's start command, for real: a server process, HTTP calls, SIGTERM, clean exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import httpx
import pytest

SCRIPT = Path(sys.executable).parent / "gradcam-service"
TINY = {
    "name": "tiny",
    "architecture": "resnet18",
    "num_classes": 4,
    "weights": "random",
    "labels": ["cat", "dog", "bird", "fish"],
    "preprocessing": {"input_size": [64, 64], "crop_pct": 1.0},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(base: str, process: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def _start_server(
    tmp_path: Path,
    models: list[dict[str, object]] | None = None,
    environment: dict[str, str] | None = None,
    **settings: str,
) -> tuple[subprocess.Popen[str], str, TextIO]:
    """Start the README's command on a free port with ``models`` (default: a tiny one) and
    ``environment`` on top of this one's (less its GRADCAM_ variables); return process, URL,
    log."""
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRADCAM_")} | {
        "GRADCAM_PORT": str(port),
        "GRADCAM_DEVICE": "cpu",
        "GRADCAM_MODELS": json.dumps(models or [TINY]),
        **{f"GRADCAM_{key.upper()}": value for key, value in settings.items()},
        **(environment or {}),
    }
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(
        [str(SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    return process, f"http://127.0.0.1:{port}", log


def _stop(process: subprocess.Popen[str], log: TextIO) -> str:
    """Kill the server if it still runs; its whole log."""
    if process.poll() is None:
        process.kill()
        process.wait()
    log.seek(0)
    output = log.read()
    log.close()
    return output


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.is_file(), reason="gradcam-service is not installed (pip -e .)")
def test_console_script_serves_and_stops_cleanly_on_sigterm(
    tmp_path: Path, make_image: Callable[..., bytes]
) -> None:
    process, base, log = _start_server(tmp_path, cpu_workers="1", graceful_shutdown_s="10")
    try:
        _wait_ready(base, process)
        image = make_image(50, 40)
        with httpx.Client(base_url=base, timeout=60) as http:
            predict = http.post(
                "/v1/models/tiny/predict",
                files={"image": ("x.png", image, "image/png")},
                data={"top_k": "2"},
            )
            assert predict.status_code == 200, predict.text
            assert len(predict.json()["results"][0]["predictions"]) == 2

            explain = http.post(
                "/v1/models/tiny/explain",
                files={"image": ("x.png", image, "image/png")},
                data={"layer": "layer4", "target": "dog", "encoding": "base64"},
            )
            assert explain.status_code == 200, explain.text
            (explanation,) = explain.json()["results"][0]["explanations"]
            assert explanation["target"]["label"] == "dog"
            assert explanation["overlay"]["media_type"] == "image/png"

            problem = http.get("/v1/models/absent")
            assert problem.status_code == 404
            assert problem.headers["content-type"] == "application/problem+json"

            large = http.post(  # an overlay large enough for the parallel PNG encoder
                "/v1/models/tiny/explain",
                files={"image": ("x.png", make_image(640, 480), "image/png")},
                data={"layer": "layer4"},
            )
            assert large.status_code == 200, large.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        output = _stop(process, log)
    assert "Traceback" not in output, output
    assert "exiting without waiting" not in output, "idle threads taken for a loading model"
    access = [line for line in output.splitlines() if " service.access " in line]
    assert any("path=/v1/models/{model}/explain status=200" in line for line in access), output


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GRADCAM_MODELS_FILE", "/nonexistent/models.yaml", "cannot read"),
        ("GRADCAM_PORT", "70000", "GRADCAM_PORT"),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    env = {key: val for key, val in os.environ.items() if not key.startswith("GRADCAM_")}
    env[variable] = value
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.is_file(), reason="gradcam-service is not installed (pip -e .)")
def test_sigterm_finishes_in_flight_requests_before_exiting(
    tmp_path: Path, make_image: Callable[..., bytes]
) -> None:
    # Long jobs queue behind each other: a wait bound far off lets all four in at once.
    process, base, log = _start_server(
        tmp_path, max_batch_size="1", graceful_shutdown_s="60", max_queue_wait_ms="600000"
    )
    image = make_image(50, 40)

    def explain_slowly() -> int:
        # Score-CAM on layers 1-3 (64 + 128 + 256 channels): 448 forward passes per request.
        response = httpx.post(
            f"{base}/v1/models/tiny/explain",
            files={"image": ("x.png", image, "image/png")},
            data={
                "layer": ["layer1", "layer2", "layer3"],
                "method": "scorecam",
                "overlay": "none",
            },
            timeout=120,
        )
        return response.status_code

    def in_flight() -> float:
        text = httpx.get(f"{base}/metrics", timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith("gradcam_http_requests_in_flight"))
        return float(line.split()[-1]) - 1.0  # not counting this /metrics request

    try:
        _wait_ready(base, process)
        with ThreadPoolExecutor(4) as pool:
            requests = [pool.submit(explain_slowly) for _ in range(4)]
            deadline = time.monotonic() + 30
            while in_flight() < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert in_flight() == 4, "the four requests were not in flight together"
            process.send_signal(signal.SIGTERM)
            statuses = [f.result(timeout=120) for f in requests]
        assert statuses == [200, 200, 200, 200]
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/livez", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _start_with_hub_model(
    tmp_path: Path, endpoint: str
) -> tuple[subprocess.Popen[str], str, TextIO]:
    """The server with one model on hub weights, the hub at ``endpoint``, an empty cache."""
    hub_model = TINY | {"weights": "hub", "fallback_to_random": True}
    return _start_server(
        tmp_path,
        [hub_model],
        {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
            "HF_HUB_OFFLINE": "",
            "HTTPS_PROXY": "",
            "https_proxy": "",
        },
    )


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.is_file(), reason="gradcam-service is not installed (pip -e .)")
def test_an_unreachable_hub_costs_no_retries_and_one_warning_line(tmp_path: Path) -> None:
    process, base, log = _start_with_hub_model(tmp_path, f"http://127.0.0.1:{_free_port()}")
    try:
        started = time.monotonic()
        _wait_ready(base, process)
        ready_s = time.monotonic() - started
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        output = _stop(process, log)
    assert ready_s < 40, f"ready after {ready_s:.1f} s: the hub's retries took about 47 s"
    warnings = [line for line in output.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, output
    assert "RANDOM WEIGHTS" in warnings[0]
    assert "127.0.0.1 cannot be reached" in warnings[0]
    assert "Retrying" not in output
    assert "Loading pretrained weights from Hugging Face hub" not in output


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.is_file(), reason="gradcam-service is not installed (pip -e .)")
def test_sigterm_while_a_model_loads_exits_within_three_seconds(tmp_path: Path) -> None:
    # A hub that accepts connections and never answers: the download hangs for minutes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    process, base, log = _start_with_hub_model(
        tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}"
    )
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in (tmp_path / "server.log").read_text():
            assert time.monotonic() < deadline, "the server did not start"
            assert process.poll() is None, "the server exited"
            time.sleep(0.1)
        time.sleep(1.0)  # the model's thread is inside the hub download now
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 503
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - sent < 3
    finally:
        silent.close()
        output = _stop(process, log)
    assert "exiting without waiting for gradcam-tiny" in output, output
    assert "Traceback" not in output, output
