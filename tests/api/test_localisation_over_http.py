"""End to end on a trained model: the map served over HTTP points at the object."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.engine.models.loaded import LoadedModel


def _png(image: torch.Tensor) -> bytes:
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_explanations_over_http_point_at_the_shape(
    shapes_model: LoadedModel,
    make_shapes_fn: Callable[[int, torch.Generator], Any],
    settings_factory: Callable[..., Any],
    until_ready: Callable[[TestClient], None],
) -> None:
    """Upload PNGs of the shapes classifier's test images; on layer2 (8x8 at 64x64) the map,
    resized to the upload, peaks on the shape and is hotter inside its box than outside."""
    shapes = make_shapes_fn(8, torch.Generator().manual_seed(7))
    files = [
        ("image", (f"{i}.png", _png(image), "image/png")) for i, image in enumerate(shapes.images)
    ]
    settings = settings_factory(models=[shapes_model.spec], max_images_per_request=8)
    with TestClient(create_app(settings)) as client:
        until_ready(client)
        response = client.post(
            "/v1/models/shapes/explain",
            files=files,
            data={
                "layer": "layer2",
                "upsampled": "original",
                "encoding": "base64",
                "overlay": "none",
            },
        )
    assert response.status_code == 200, response.text
    correct = hits = 0
    contrasts = []
    results = response.json()["results"]
    for result, label, box in zip(
        results, shapes.labels.tolist(), shapes.boxes.tolist(), strict=True
    ):
        correct += result["predictions"][0]["index"] == label
        explanation = result["explanations"][0]
        assert explanation["target"]["index"] == result["predictions"][0]["index"]
        upsampled = explanation["upsampled"]
        heat = np.frombuffer(base64.b64decode(upsampled["data"]), dtype="<f4")
        heat = heat.reshape(upsampled["shape"])
        assert heat.shape == (64, 64)
        left, top, right, bottom = box
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        margin = 4
        hits += (left - margin <= x + 0.5 <= right + margin) and (
            top - margin <= y + 0.5 <= bottom + margin
        )
        inside = np.zeros(heat.shape, dtype=bool)
        inside[int(top) : int(bottom) + 1, int(left) : int(right) + 1] = True
        contrasts.append(heat[inside].mean() / (heat.mean() + 1e-7))
    assert correct >= 7, f"{correct}/8 classified correctly"
    assert hits >= 7, f"the map peaks on the shape in only {hits}/8 images"
    assert float(np.median(contrasts)) > 2.0, contrasts
