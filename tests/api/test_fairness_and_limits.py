"""Fairness between API keys, the per-caller queue bound, the answer-size guard, the upsampled
map's size cap and the security headers."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.engine.models.spec import ModelSpec
from service.runtime import workers
from service.settings import Settings

SettingsFactory = Callable[..., Settings]
ReadyWaiter = Callable[[TestClient], None]
ImageFactory = Callable[..., bytes]

HEAVY = "heavy-caller-key-0123456789"
LIGHT = "light-caller-key-9876543210"
BATCH_S = 0.4  # every batch is held this long, so queueing is measured in batches


@pytest.fixture(scope="module")
def slow_batches() -> Iterator[None]:
    real = workers.run_group

    def slow(replica: Any, group: list[Any], config: Any, *rest: Any) -> Any:
        time.sleep(BATCH_S)
        return real(replica, group, config, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workers, "run_group", slow)
        yield


@contextmanager
def _served(
    settings_factory: SettingsFactory,
    tiny_spec: ModelSpec,
    until_ready: ReadyWaiter,
    **overrides: Any,
) -> Iterator[TestClient]:
    """The tiny model behind the two keys, batches of 4, 24 images per caller."""
    settings = settings_factory(
        models=[tiny_spec],
        api_keys=[HEAVY, LIGHT],
        max_batch_size=4,
        max_queue_size=64,
        max_queued_per_caller=24,
        cpu_workers=2,
        **overrides,
    )
    with TestClient(create_app(settings)) as client:
        until_ready(client)
        yield client


@pytest.fixture(scope="module")
def two_keys(
    settings_factory: SettingsFactory,
    tiny_spec: ModelSpec,
    until_ready: ReadyWaiter,
    slow_batches: None,
) -> Iterator[TestClient]:
    """With the default wait bound (2 s)."""
    with _served(settings_factory, tiny_spec, until_ready) as client:
        yield client


@pytest.fixture(scope="module")
def two_keys_counted(
    settings_factory: SettingsFactory,
    tiny_spec: ModelSpec,
    until_ready: ReadyWaiter,
    slow_batches: None,
) -> Iterator[TestClient]:
    """With the queue bounded in images only, so that a caller reaches its own bound."""
    with _served(settings_factory, tiny_spec, until_ready, max_queue_wait_ms=60_000) as client:
        yield client


def _queued(client: TestClient) -> float:
    for line in client.get("/metrics", headers={"X-API-Key": HEAVY}).text.splitlines():
        if line.startswith('gradcam_queue_depth{model="tiny"}'):
            return float(line.split()[-1])
    return 0.0


def _predict(client: TestClient, key: str, images: list[bytes]) -> Any:
    files = [("image", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    return client.post("/v1/models/tiny/predict", files=files, headers={"X-API-Key": key})


@contextmanager
def _flood(
    client: TestClient, image: bytes, *, requests: int, queued: int
) -> Iterator[list[Future[Any]]]:
    """The heavy key's requests of 4 images each, in flight until the block ends; the block
    starts once at least ``queued`` images wait."""
    with ThreadPoolExecutor(requests) as pool:
        flood = [pool.submit(_predict, client, HEAVY, [image] * 4) for _ in range(requests)]
        deadline = time.monotonic() + 30
        while _queued(client) < queued and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _queued(client) >= queued, "the flood never queued up"
        yield flood
        for future in flood:
            future.result()


def test_a_flood_from_one_key_delays_another_keys_request_by_at_most_one_batch(
    two_keys: TestClient, make_image: ImageFactory
) -> None:
    image = make_image(32, 32)
    with _flood(two_keys, image, requests=5, queued=12) as flood:
        light = _predict(two_keys, LIGHT, [image])
    heavy = [future.result() for future in flood]
    assert light.status_code == 200, light.text
    assert all(response.status_code == 200 for response in heavy)
    waited = light.json()["results"][0]["timings"]["queue_ms"] / 1000
    # First come, first served it would wait for the >= 3 batches queued ahead of it.
    assert waited < 1.5 * BATCH_S, f"the light caller waited {waited:.2f} s"
    heavy_waits = [r.json()["results"][0]["timings"]["queue_ms"] / 1000 for r in heavy]
    assert max(heavy_waits) > 2 * BATCH_S, "the flood itself must have queued"


def test_a_caller_past_its_queue_bound_gets_429_while_others_are_served(
    two_keys_counted: TestClient, make_image: ImageFactory
) -> None:
    image = make_image(32, 32)
    with _flood(two_keys_counted, image, requests=7, queued=20):
        over = _predict(two_keys_counted, HEAVY, [image] * 4)
        light = _predict(two_keys_counted, LIGHT, [image] * 4)
    assert over.status_code == 429, over.text
    assert over.json()["code"] == "caller_limit"
    assert "limit 24 per caller" in over.json()["detail"]
    assert int(over.headers["retry-after"]) >= 1
    assert light.status_code == 200, light.text


@pytest.fixture(scope="module")
def guarded(
    settings_factory: SettingsFactory, tiny_spec: ModelSpec, until_ready: ReadyWaiter
) -> Iterator[TestClient]:
    settings = settings_factory(
        models=[tiny_spec],
        max_response_bytes=8 * 1024 * 1024,
        max_upsampled_side=256,
        max_upload_bytes=8 * 1024 * 1024,
    )
    with TestClient(create_app(settings)) as client:
        until_ready(client)
        yield client


def _explain(client: TestClient, image: bytes, **params: str) -> Any:
    return client.post(
        "/v1/models/tiny/explain",
        files={"image": ("photo.png", image, "image/png")},
        data=params,
    )


def test_an_answer_estimated_past_the_limit_is_refused_before_any_model_work(
    guarded: TestClient, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = threading.Event()
    real = workers.run_group

    def spy(*args: Any) -> Any:
        ran.set()
        return real(*args)

    monkeypatch.setattr(workers, "run_group", spy)
    photo = make_image(1600, 1200)
    heavy = {"upsampled": "original", "encoding": "list", "top_k": "4", "layer": "layer1"}
    response = guarded.post(
        "/v1/models/tiny/explain",
        files={"image": ("photo.png", photo, "image/png")},
        data={**heavy, "layer": ["layer1", "layer2", "layer3"]},
    )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "response_too_large"
    assert "limit is 8 MiB" in problem["detail"]
    assert "encoding=base64" in problem["detail"]
    assert not ran.is_set(), "no model work for a refused answer"
    # Following the advice gets an answer, and it is smaller than the limit.
    small = _explain(
        guarded, photo, upsampled="original", encoding="base64", top_k="4", overlay="jpeg"
    )
    assert small.status_code == 200, small.text
    assert len(small.content) < 8 * 1024 * 1024


def test_original_size_maps_are_capped_on_the_long_side_and_state_their_scale(
    guarded: TestClient, make_image: ImageFactory
) -> None:
    photo = make_image(1000, 600)
    response = _explain(guarded, photo, upsampled="original", encoding="base64")
    assert response.status_code == 200, response.text
    upsampled = response.json()["results"][0]["explanations"][0]["upsampled"]
    assert upsampled["shape"] == [154, 256]
    assert upsampled["scale"] == pytest.approx(0.256)
    values = np.frombuffer(base64.b64decode(upsampled["data"]), dtype="<f4")
    assert values.size == 154 * 256
    small = _explain(guarded, make_image(200, 100), upsampled="original")
    assert small.json()["results"][0]["explanations"][0]["upsampled"]["scale"] == 1.0


def test_every_response_carries_the_security_headers(guarded: TestClient, png: bytes) -> None:
    for response in (
        _explain(guarded, png),
        guarded.get("/v1/models/nope"),
        guarded.get("/livez"),
        guarded.post("/v1/models/tiny/explain", content=b"x" * (9 * 1024 * 1024)),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
