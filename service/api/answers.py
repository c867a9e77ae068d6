"""Turning engine and runtime results into response bodies, and the warnings they carry.

The response models (:mod:`service.api.schemas.responses`) are plain data; every rule about
what goes into them (which predictions are listed, how maps are encoded, when a warning is
due) is here.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from service.api.problems import service_problem
from service.api.schemas.requests import ExplainParams
from service.api.schemas.responses import (
    DicomSchema,
    Encoding,
    ExplainResponse,
    Explanation,
    ImageExplanation,
    ImagePrediction,
    InputBox,
    LayerList,
    LayerSchema,
    MapArray,
    ModelInfo,
    ModelStatusSchema,
    NotReadyProblem,
    OriginalImage,
    Overlay,
    Prediction,
    PredictResponse,
    PreprocessingSchema,
    Target,
    TimingsSchema,
    UpsampledMap,
    ValueRange,
    WeightsSchema,
    WorkSchema,
)
from service.engine.cam.explain import CamMap
from service.engine.imaging.images import DecodedImage
from service.engine.models.layers import LayerInfo
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import Geometry
from service.engine.models.spec import ModelSpec
from service.errors import ServiceNotReadyError
from service.runtime.jobs import ExplainOutcome, PredictOutcome, RenderedMap, Timings
from service.runtime.replicas import ModelStatus
from service.runtime.workers import ModelWork

#: Predictions listed with each explained image (at least; more when ``top_k`` asks for more).
EXPLAIN_PREDICTIONS = 5

# ============================================================================ models


def model_info(model: LoadedModel, replicas: int, work: ModelWork | None = None) -> ModelInfo:
    """A loaded model, with everything a client needs to call it, and what it is busy with."""
    weights = model.weights
    return ModelInfo(
        name=model.name,
        architecture=model.spec.architecture,
        state="ready",
        ready=True,
        num_classes=model.num_classes,
        labels=list(model.labels),
        input_size=model.input_size,
        preprocessing=PreprocessingSchema(**dataclasses.asdict(model.preprocessing)),
        default_layer=model.default_layer,
        activation=model.activation,
        device=str(model.device),
        replicas=replicas,
        weights=WeightsSchema(
            source=weights.source,
            location=weights.location,
            random=weights.random,
            note=weights.note,
        ),
        work=None
        if work is None
        else WorkSchema(
            queued=work.queued,
            long_jobs_running=work.long_running,
            long_jobs_queued=work.long_queued,
            long_jobs_remaining_s=round(work.long_remaining_s, 3),
            forward_pass_s=None if work.forward_pass_s is None else round(work.forward_pass_s, 6),
        ),
    )


def pending_model_info(spec: ModelSpec, status: ModelStatus) -> ModelInfo:
    """A model that is not (or no longer) loaded: what its spec and status say."""
    return ModelInfo(
        name=spec.name,
        architecture=spec.architecture,
        state=status.state,
        ready=False,
        error=status.error,
        replicas=status.replicas,
    )


def layer_schema(info: LayerInfo) -> LayerSchema:
    return LayerSchema(
        name=info.name,
        module_type=info.module_type,
        output_shape=list(info.output_shape),
        layout=info.layout,
        grid=info.grid,
        channels=info.channels,
        prefix_tokens=info.prefix_tokens,
        stage=info.stage,
        layer_index=info.layer_index,
    )


def layer_list(model: LoadedModel) -> LayerList:
    return LayerList(
        model=model.name,
        default_layer=model.default_layer,
        layers=[layer_schema(info) for info in model.layers],
    )


# ============================================================================ results


def original_image(image: DecodedImage) -> OriginalImage:
    dicom = None
    if image.dicom is not None:
        description = dataclasses.asdict(image.dicom.description)  # no header: no patient data
        dicom = DicomSchema.model_validate(description)
    return OriginalImage(
        width=image.width,
        height=image.height,
        mode=image.original_mode,
        format=image.format,
        dicom=dicom,
    )


def input_box(geometry: Geometry) -> InputBox:
    left, top, right, bottom = geometry.input_box()
    return InputBox(left=left, top=top, right=right, bottom=bottom)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def timings_schema(timings: Timings, decode_s: float) -> TimingsSchema:
    return TimingsSchema(
        decode_ms=_ms(decode_s),
        preprocess_ms=_ms(timings.preprocess),
        queue_ms=_ms(timings.queue),
        compute_ms=_ms(timings.compute),
        render_ms=_ms(timings.render),
        batch_size=timings.batch_size,
    )


def top_predictions(model: LoadedModel, probabilities: np.ndarray, k: int) -> list[Prediction]:
    k = max(1, min(k, probabilities.shape[-1]))
    order = np.argsort(-probabilities, kind="stable")[:k]
    values = probabilities[order].tolist()
    return [
        Prediction(index=int(i), label=model.labels[int(i)], probability=p)
        for i, p in zip(order.tolist(), values, strict=True)
    ]


def weights_warnings(model: LoadedModel) -> list[str]:
    warning = model.weights.random_warning(model.name, "predictions and explanations")
    return [] if warning is None else [warning]


def map_warnings(cam: CamMap, label: str) -> list[str]:
    """Say so when a map carries no information, rather than return a silent blank."""
    if cam.raw_max > 0:
        return []
    return [
        f"The map is empty: at layer '{cam.layer}' nothing raises the score of '{label}' (all"
        f" values are <= 0 before rectification). Try another layer or method; for class-token"
        f" ViTs the last block's output gets no gradient on its patch tokens (use its norm1)."
    ]


def image_warnings(model: LoadedModel, outcome: ExplainOutcome, params: ExplainParams) -> list[str]:
    """Say so when min_probability left an image with nothing to explain."""
    if params.min_probability is None or outcome.maps:
        return []
    best = int(np.argmax(outcome.probabilities))
    return [
        f"No class reaches min_probability {params.min_probability:g}: the most probable,"
        f" '{model.labels[best]}', has {float(outcome.probabilities[best]):.4f}. Nothing was"
        " explained; lower min_probability or name a target."
    ]


def predict_response(
    model: LoadedModel,
    images: Sequence[DecodedImage],
    outcomes: Sequence[PredictOutcome],
    top_k: int,
    decode_s: float,
) -> PredictResponse:
    return PredictResponse(
        model=model.name,
        random_weights=model.weights.random,
        warnings=weights_warnings(model),
        results=[
            ImagePrediction(
                index=i,
                original=original_image(image),
                predictions=top_predictions(model, outcome.probabilities, top_k),
                timings=timings_schema(outcome.timings, decode_s),
            )
            for i, (image, outcome) in enumerate(zip(images, outcomes, strict=True))
        ],
    )


def encode_map(array: np.ndarray, encoding: Encoding) -> MapArray:
    """Nested lists (``ndarray.tolist()``) or base64 of ``ndarray.astype('<f4').tobytes()``."""
    values = np.ascontiguousarray(array, dtype="<f4")
    height, width = values.shape
    data: list[list[float]] | str
    if encoding == "base64":
        data = base64.b64encode(values.tobytes()).decode("ascii")
    else:
        data = values.tolist()
    # Built by us from a float32 array: skip re-validating every element.
    return MapArray.model_construct(
        shape=(height, width), dtype="float32", encoding=encoding, data=data
    )


def _explanation(model: LoadedModel, rendered: RenderedMap, params: ExplainParams) -> Explanation:
    cam = rendered.cam
    upsampled = None
    if rendered.upsampled is not None and params.upsampled != "none":
        base = encode_map(rendered.upsampled, params.encoding)
        upsampled = UpsampledMap.model_construct(
            **dict(base), size=params.upsampled, scale=rendered.upsampled_scale
        )
    overlay = None
    if rendered.overlay is not None and rendered.overlay_size is not None:
        overlay = Overlay(
            media_type=rendered.overlay_media_type or "application/octet-stream",
            width=rendered.overlay_size[0],
            height=rendered.overlay_size[1],
            data=base64.b64encode(rendered.overlay).decode("ascii"),
        )
    label = model.labels[cam.target]
    return Explanation(
        target=Target(index=cam.target, label=label, probability=cam.probability, logit=cam.logit),
        layer=cam.layer,
        method=cam.method,
        heatmap=encode_map(cam.grid_normalized, params.encoding) if params.heatmap else None,
        raw_heatmap=encode_map(cam.grid, params.encoding) if params.heatmap else None,
        raw_range=ValueRange(min=cam.raw_min, max=cam.raw_max),
        upsampled=upsampled,
        overlay=overlay,
        warnings=map_warnings(cam, label),
        scores=dict(cam.scores) if params.scores else None,
    )


def explain_response(
    model: LoadedModel,
    images: Sequence[DecodedImage],
    outcomes: Sequence[ExplainOutcome],
    params: ExplainParams,
    decode_s: float,
) -> ExplainResponse:
    listed = max(EXPLAIN_PREDICTIONS, params.top_k)
    return ExplainResponse(
        model=model.name,
        random_weights=model.weights.random,
        warnings=weights_warnings(model),
        results=[
            ImageExplanation(
                index=i,
                original=original_image(image),
                input_box=input_box(outcome.geometry),
                predictions=top_predictions(model, outcome.probabilities, listed),
                explanations=[_explanation(model, rendered, params) for rendered in outcome.maps],
                warnings=image_warnings(model, outcome, params),
                timings=timings_schema(outcome.timings, decode_s),
            )
            for i, (image, outcome) in enumerate(zip(images, outcomes, strict=True))
        ],
    )


# ============================================================================ health


def model_statuses(statuses: Mapping[str, ModelStatus]) -> dict[str, ModelStatusSchema]:
    return {
        name: ModelStatusSchema(state=s.state, error=s.error, replicas=s.replicas)
        for name, s in statuses.items()
    }


def not_ready_problem(
    models: Mapping[str, ModelStatusSchema], instance: str | None
) -> NotReadyProblem:
    """The /readyz 503: which models are still loading or failed."""
    waiting = [f"{name} ({m.state})" for name, m in models.items() if m.state != "ready"]
    detail = (
        f"{len(waiting)} of {len(models)} models not ready: {', '.join(waiting)}."
        if waiting
        else "The service is starting or stopping."
    )
    error = ServiceNotReadyError(detail)
    return NotReadyProblem(**dict(service_problem(error, instance)), models=dict(models))
