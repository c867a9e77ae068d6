"""Fixtures for the HTTP API: tiny random-weight models served by a real runtime.

Helpers are handed out as fixtures (not imported from here): several conftest.py files share
the module name ``conftest``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.engine.models.spec import ModelSpec
from service.settings import Settings

LABELS = ["cat", "dog", "bird", "fish"]
TINY = ModelSpec(
    name="tiny",
    architecture="resnet18",
    num_classes=4,
    weights="random",
    labels=LABELS,
    preprocessing={"input_size": (64, 64), "crop_pct": 1.0},
)
VIT = ModelSpec(
    name="vit",
    architecture="vit_tiny_patch16_224",
    num_classes=3,
    weights="random",
    model_kwargs={"img_size": 64, "depth": 2},
)
#: A grey, multi-label model, shaped like a chest X-ray classifier.
XRAY = ModelSpec(
    name="xray",
    architecture="resnet18",
    num_classes=3,
    weights="random",
    labels=["effusion", "nodule", "pneumothorax"],
    activation="sigmoid",
    preprocessing={"input_size": (64, 64), "crop_pct": 1.0},
    model_kwargs={"in_chans": 1},
)
MAX_UPLOAD_BYTES = 256 * 1024
MAX_IMAGES = 4


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "models": [TINY, VIT],
        "device": "cpu",
        "max_upload_bytes": MAX_UPLOAD_BYTES,
        "max_images_per_request": MAX_IMAGES,
        "max_batch_wait_ms": 1.0,
        "cpu_workers": 2,
    }
    values.update(overrides)
    return Settings.model_validate(values)


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout:g} s: {client.get('/readyz').text}")


def wait_served(base: str, timeout: float = 120.0) -> None:
    """Poll ``{base}/readyz`` over HTTP until a real server answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{base} did not become ready in {timeout:g} s"
        time.sleep(0.1)


def image_bytes(
    width: int = 80, height: int = 60, fmt: str = "PNG", seed: int = 0, mode: str = "RGB"
) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


ImageFactory = Callable[..., bytes]
SettingsFactory = Callable[..., Settings]
ReadyWaiter = Callable[[TestClient], None]


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return TINY


@pytest.fixture(scope="session")
def vit_spec() -> ModelSpec:
    return VIT


@pytest.fixture(scope="session")
def make_image() -> ImageFactory:
    """``make_image(width=80, height=60, fmt="PNG", seed=0, mode="RGB") -> bytes``."""
    return image_bytes


@pytest.fixture(scope="session")
def settings_factory() -> SettingsFactory:
    """Settings for the tiny models, with overrides."""
    return make_settings


@pytest.fixture(scope="session")
def until_ready() -> ReadyWaiter:
    return wait_ready


@pytest.fixture(scope="session")
def until_served() -> Callable[[str], None]:
    """``until_served(base_url)``: wait until a server started by the test is ready."""
    return wait_served


@pytest.fixture(scope="session")
def settings() -> Settings:
    return make_settings()


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """One served app for the whole session: loading even tiny models takes seconds."""
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="session")
def png() -> bytes:
    return image_bytes()


@pytest.fixture(scope="session")
def clinical_client() -> Iterator[TestClient]:
    """An app serving an RGB model (``tiny``) and a grey multi-label one (``xray``)."""
    with TestClient(create_app(make_settings(models=[TINY, XRAY]))) as client:
        wait_ready(client)
        yield client
