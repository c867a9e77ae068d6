"""Start-up and readiness, client disconnects, metrics and the access log."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from service.api import disconnects
from service.api.app import create_app
from service.engine.models.spec import ModelSpec
from service.errors import ModelLoadError
from service.runtime import replicas as replicas_module
from service.settings import Settings

ImageFactory = Callable[..., bytes]


def _files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"image{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


def test_not_ready_while_loading_then_ready(
    monkeypatch: pytest.MonkeyPatch,
    settings_factory: Callable[..., Settings],
    until_ready: Callable[[TestClient], None],
    tiny_spec: ModelSpec,
    png: bytes,
) -> None:
    release = threading.Event()
    real_load = replicas_module.load_model

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        release.wait(timeout=60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(replicas_module, "load_model", slow_load)
    app = create_app(settings_factory(models=[tiny_spec]))
    with TestClient(app) as client:
        try:
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.headers["content-type"] == "application/problem+json"
            assert ready.headers["retry-after"] == "5"
            body = ready.json()
            assert body["code"] == "not_ready"
            assert body["models"] == {"tiny": {"state": "loading", "replicas": 0}}

            predict = client.post("/v1/models/tiny/predict", files=_files(png))
            assert predict.status_code == 503, predict.text
            assert predict.json()["code"] == "model_not_ready"
            assert predict.headers["retry-after"] == "5"
            assert client.get("/v1/models/tiny/layers").status_code == 503

            info = client.get("/v1/models/tiny")
            assert info.status_code == 200, info.text
            assert info.json()["state"] == "loading"
            assert info.json()["ready"] is False
            assert client.get("/livez").status_code == 200
        finally:
            release.set()  # never leave the loader thread waiting, even on failure
        until_ready(client)
        predict = client.post("/v1/models/tiny/predict", files=_files(png))
        assert predict.status_code == 200, predict.text


@pytest.mark.parametrize(
    ("error", "reported"),
    [
        (
            ModelLoadError("Weights from tiny.safetensors do not fit the architecture."),
            "Weights from tiny.safetensors do not fit the architecture.",
        ),
        (  # an unexpected failure says what happened, not only its class name
            RuntimeError("expected input[2, 3, 64, 64] to have 1 channels\nmore detail"),
            "RuntimeError: expected input[2, 3, 64, 64] to have 1 channels",
        ),
    ],
)
def test_failed_model_is_reported_by_readyz(
    monkeypatch: pytest.MonkeyPatch,
    settings_factory: Callable[..., Settings],
    tiny_spec: ModelSpec,
    error: Exception,
    reported: str,
) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise error

    monkeypatch.setattr(replicas_module, "load_model", broken)
    with TestClient(create_app(settings_factory(models=[tiny_spec]))) as client:
        for _ in range(200):
            body = client.get("/readyz").json()
            if body["models"]["tiny"]["state"] != "loading":
                break
            threading.Event().wait(0.02)
        assert body["models"]["tiny"]["state"] == "failed"
        assert body["models"]["tiny"]["error"] == reported
        listed = client.get("/v1/models").json()["models"]
        assert listed[0]["state"] == "failed"


class _FakeRequest:
    """Says the client is gone after ``polls`` checks."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    async def is_disconnected(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_disconnected_client_cancels_its_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disconnects, "DISCONNECT_POLL_S", 0.01)
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario() -> None:
        request: Any = _FakeRequest(polls=2)
        with pytest.raises(disconnects.ClientDisconnectedError):
            await disconnects.until_disconnected(request, forever())
        await asyncio.wait_for(cancelled.wait(), 1)

    asyncio.run(scenario())


def test_connected_client_gets_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disconnects, "DISCONNECT_POLL_S", 0.01)

    async def slowish() -> int:
        await asyncio.sleep(0.05)
        return 7

    async def scenario() -> int:
        request: Any = _FakeRequest(polls=1000)
        return await disconnects.until_disconnected(request, slowish())

    assert asyncio.run(scenario()) == 7


def test_request_of_a_departed_client_is_dropped(
    client: TestClient, png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disconnects, "DISCONNECT_POLL_S", 0.01)
    started, cancelled = threading.Event(), threading.Event()

    async def stuck(*_: object) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def gone(_: Request) -> bool:
        return started.is_set()

    monkeypatch.setattr(client.app.state.runtime, "predict", stuck)  # type: ignore[attr-defined]
    monkeypatch.setattr(Request, "is_disconnected", gone)
    response = client.post("/v1/models/tiny/predict", files=_files(png))
    assert response.status_code == 499
    assert cancelled.wait(5), "the runtime call must be cancelled"


def test_metrics_count_requests_by_route_template(client: TestClient, png: bytes) -> None:
    assert client.post("/v1/models/tiny/predict", files=_files(png)).status_code == 200
    assert client.get("/v1/models/nope").status_code == 404
    client.get("/no/such/route")
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'gradcam_http_requests_total{endpoint="/v1/models/{model}/predict",method="POST",'
        'status="200"}' in text
    )
    assert 'endpoint="/v1/models/{model}",method="GET",status="404"' in text
    assert 'endpoint="unmatched",method="GET",status="404"' in text
    assert "/v1/models/tiny/predict" not in text, "raw paths must not become labels"
    assert "gradcam_http_request_duration_seconds_bucket" in text
    assert "gradcam_http_requests_in_flight" in text
    assert 'gradcam_batch_size_bucket{kind="predict"' in text


def test_access_log_one_line_per_request(
    client: TestClient,
    make_image: ImageFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = [make_image(seed=s) for s in (5, 6)]
    with caplog.at_level(logging.INFO, logger="service.access"):
        response = client.post("/v1/models/tiny/predict", files=_files(*images))
    assert response.status_code == 200, response.text
    lines = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert len(lines) == 1
    (line,) = lines
    fields = dict(part.split("=", 1) for part in line.split())
    assert fields["method"] == "POST"
    assert fields["path"] == "/v1/models/{model}/predict"
    assert fields["status"] == "200"
    assert fields["model"] == "tiny"
    assert fields["images"] == "2"
    assert float(fields["duration_ms"]) > 0


def test_probes_are_logged_at_debug_so_polling_does_not_bury_the_requests(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="service.access"):
        assert client.get("/livez").status_code == 200
        client.get("/readyz")
        assert client.get("/v1/models").status_code == 200
    levels = {
        r.getMessage().split()[1]: r.levelno for r in caplog.records if r.name == "service.access"
    }
    assert levels == {
        "path=/livez": logging.DEBUG,
        "path=/readyz": logging.DEBUG,
        "path=/v1/models": logging.INFO,
    }


def test_openapi_and_docs_are_served(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
