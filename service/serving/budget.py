"""The size of an explain answer, estimated before any model work, and its limit.

A request's answer grows with images x targets x layers x outputs, and a map sent as a JSON
list costs about four times its base64 form; without a bound, one phone photo asked for with
``upsampled=original`` and ``encoding=list`` once made a half-gigabyte answer. The estimate is
on the high side for photographs (measured: 1.2x to 3x the real size; more for WebP, which
compresses best) and may fall short for pure noise, whose overlays do not compress.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from service.engine.imaging.images import DecodedImage
from service.engine.models.loaded import LoadedModel
from service.engine.pictures.overlays import panel_size_bound
from service.engine.plan import ExplainPlan
from service.errors import ResponseTooLargeError
from service.runtime.jobs import MapEncoding, OutputOptions
from service.runtime.outputs import OVERLAY_MAX_SIDE, fit_within

#: Bytes per map value: a float32 as JSON text ("0.12345678901234567, ") or as base64.
_LIST_VALUE_BYTES: Final = 20
_BASE64_VALUE_BYTES: Final = 16 / 3
#: Bytes per overlay pixel before base64, measured on photo-like images: a PNG overlay keeps
#: about a third of its raw RGB bytes (noise keeps all), JPEG/WebP at quality 90 far less; a
#: DICOM Secondary Capture stores them all, uncompressed.
_PICTURE_PIXEL_BYTES: Final = {
    "png": 1.5,
    "panel": 1.5,
    "jpeg": 0.35,
    "webp": 0.35,
    "dicom": 3.0,
}
#: Targets, labels, ranges and the other members of one explanation.
_EXPLANATION_OVERHEAD: Final = 1024
#: One faithfulness score: '"confidence_change": -0.12345678901234567, '.
_SCORE_BYTES: Final = 48


def estimate_explain_bytes(
    model: LoadedModel,
    plan: ExplainPlan,
    outputs: OutputOptions,
    encoding: MapEncoding,
    images: Sequence[DecodedImage],
    max_upsampled_side: int,
) -> int:
    """An upper estimate of the JSON answer's size in bytes."""
    value_bytes = _BASE64_VALUE_BYTES if encoding == "base64" else _LIST_VALUE_BYTES
    layer_names = model.layer_names(plan.layers)
    targets = plan.request.most_targets(model.num_classes)
    scores = len(plan.scores.names) if plan.scores is not None else 0
    grid_values = sum(h * w for h, w in (model.layer(name).grid for name in layer_names))
    total = 0
    for image in images:
        values = 2 * grid_values if outputs.heatmap else 0  # heatmap and raw_heatmap
        per_layer = 0
        if outputs.upsampled == "input":
            per_layer = model.input_size[0] * model.input_size[1]
        elif outputs.upsampled == "original":
            width, height = fit_within(image.width, image.height, max_upsampled_side)
            per_layer = width * height
        values += per_layer * len(layer_names)
        picture = 0.0
        if outputs.overlay != "none":
            width, height = fit_within(image.width, image.height, OVERLAY_MAX_SIDE)
            if outputs.overlay == "panel":
                width, height = panel_size_bound(width, height)
            picture = width * height * _PICTURE_PIXEL_BYTES[outputs.overlay] * 4 / 3
        per_target = values * value_bytes + picture * len(layer_names)
        per_map = _EXPLANATION_OVERHEAD + _SCORE_BYTES * scores
        total += round(targets * (per_target + per_map * len(layer_names)))
    return total


def check_explain_size(
    model: LoadedModel,
    plan: ExplainPlan,
    outputs: OutputOptions,
    encoding: MapEncoding,
    images: Sequence[DecodedImage],
    *,
    max_upsampled_side: int,
    limit: int,
) -> None:
    """Refuse (``response_too_large``) an answer estimated past ``limit`` bytes."""
    estimate = estimate_explain_bytes(model, plan, outputs, encoding, images, max_upsampled_side)
    if estimate <= limit:
        return
    targets = plan.request.most_targets(model.num_classes)
    hints = []
    if encoding == "list":
        hints.append("encoding=base64 (about 4x smaller)")
    if outputs.upsampled != "none":
        hints.append("upsampled=none or input (the grid heatmap is always there)")
    if outputs.overlay in ("png", "panel"):
        hints.append("overlay=jpeg or none")
    hints.append("fewer images, targets or layers per request")
    raise ResponseTooLargeError(
        f"The answer would be about {estimate / 2**20:.0f} MiB ({len(images)} images x {targets}"
        f" targets x {len(model.layer_names(plan.layers))} layers); the limit is"
        f" {limit / 2**20:.0f} MiB (GRADCAM_MAX_RESPONSE_BYTES). Use " + ", ".join(hints) + "."
    )
