"""Large photos take the fast path (reduced decoding) and get the exact path's answers.

The trained shapes model sees phone-sized photos of its shapes: each 64x64 scene enlarged to
several megapixels, with sensor-like noise, saved as JPEG or PNG. Decoding only the pixels the
model's resize and the overlay need must leave probabilities within 1e-2 and maps correlated
above 0.99 with decoding every pixel (GRADCAM_EXACT_DECODE).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.cam.explain import ImageRequest
from service.engine.models.loaded import LoadedModel
from service.engine.plan import ExplainPlan
from service.metrics import Metrics
from service.runtime.config import RuntimeConfig
from service.runtime.jobs import ExplainJob, ExplainOutcome, OutputOptions
from service.runtime.runtime import Runtime

ShapesFactory = Callable[[int, torch.Generator], Any]
PROBABILITY_TOLERANCE = 1e-2
MIN_MAP_CORRELATION = 0.99


def _photos(make_shapes_fn: ShapesFactory) -> list[tuple[str, bytes]]:
    """(name, file) pairs: 3 JPEGs (one landscape 4032x3024, one portrait), 1 PNG."""
    scenes = make_shapes_fn(4, torch.Generator().manual_seed(11)).images
    rng = np.random.default_rng(5)
    photos = []
    for index, (size, fmt) in enumerate(
        [
            ((4032, 3024), "JPEG"),
            ((3024, 4032), "JPEG"),
            ((2048, 2048), "JPEG"),
            ((1600, 1200), "PNG"),
        ]
    ):
        scene = (scenes[index].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(scene).resize(size, Image.Resampling.BICUBIC), np.float32)
        noisy = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        photos.append((f"{fmt.lower()}-{size[0]}x{size[1]}", buffer.getvalue()))
    return photos


def _explain_all(
    model: LoadedModel, photos: list[tuple[str, bytes]], exact: bool
) -> tuple[list[ExplainOutcome], list[tuple[int, int]]]:
    outputs = OutputOptions(upsampled="original", overlay="png")

    async def scenario() -> tuple[list[ExplainOutcome], list[tuple[int, int]]]:
        runtime = Runtime([model.spec], RuntimeConfig(device="cpu", exact_decode=exact), Metrics())
        await runtime.start()
        assert await runtime.wait_ready(120)
        try:
            images = await runtime.decode(
                [data for _, data in photos], model="shapes", overlay=True
            )
            jobs = [
                ExplainJob(
                    image=i, plan=ExplainPlan(ImageRequest(layers=("layer2",))), outputs=outputs
                )
                for i in images
            ]
            return await runtime.explain("shapes", jobs), [i.image.size for i in images]
        finally:
            await runtime.stop()

    return asyncio.run(scenario())


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_reduced_decoding_keeps_probabilities_and_maps_of_exact_decoding(
    shapes_model: LoadedModel, make_shapes_fn: ShapesFactory
) -> None:
    photos = _photos(make_shapes_fn)
    fast, fast_sizes = _explain_all(shapes_model, photos, exact=False)
    exact, exact_sizes = _explain_all(shapes_model, photos, exact=True)
    for (name, _), quick, full, decoded, whole in zip(
        photos, fast, exact, fast_sizes, exact_sizes, strict=True
    ):
        # JPEG: DCT scaling to 1/4 (1008 px, an overlay's display size less 5%) or 1/2.
        fewer = 16 if "4032" in name else 4 if name.startswith("jpeg") else 1
        assert decoded[0] * decoded[1] * fewer <= whole[0] * whole[1], f"{name} decoded in full"
        assert np.abs(quick.probabilities - full.probabilities).max() < PROBABILITY_TOLERANCE, name
        for q, f in zip(quick.maps, full.maps, strict=True):
            assert q.cam.target == f.cam.target
            assert _correlation(q.cam.input_map, f.cam.input_map) > MIN_MAP_CORRELATION, name
            assert q.upsampled is not None
            assert f.upsampled is not None
            assert q.upsampled.shape == f.upsampled.shape, "same map size from either path"
            assert _correlation(q.upsampled, f.upsampled) > MIN_MAP_CORRELATION, name
            assert q.overlay_size is not None
            assert f.overlay_size is not None
            # Drawn on the decoded copy when it is within 5% of the display size.
            assert 0.95 * f.overlay_size[0] <= q.overlay_size[0] <= f.overlay_size[0]


@pytest.mark.parametrize("exact", [False, True])
def test_geometry_is_in_the_uploads_pixels_either_way(
    shapes_model: LoadedModel, make_shapes_fn: ShapesFactory, exact: bool
) -> None:
    photos = _photos(make_shapes_fn)[:1]
    (outcome,), _ = _explain_all(shapes_model, photos, exact=exact)
    assert outcome.geometry.original_size == (3024, 4032)
    assert outcome.maps[0].upsampled is not None
    assert outcome.maps[0].upsampled.shape == (768, 1024)
