"""The service's operations, whatever protocol asked for them: predict and explain a request.

One chain for every protocol: admission before anything is read (a request its model's queue
would refuse costs nothing), decoding off the event loop at the scale the model and the overlay
need, the answer's size bound (before any model work), then the runtime's batched work. A
protocol (the v1 routes; later others) turns its parameters into an
:class:`~service.engine.plan.ExplainPlan` and :class:`~service.runtime.jobs.OutputOptions`,
calls these, and writes the answer in its own dialect. ``watch`` is how a protocol cancels the
work of a client that went away (over HTTP: polling the connection).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from service.engine.imaging.dicom_display import DisplayOptions
from service.engine.imaging.images import DecodedImage
from service.engine.models.loaded import LoadedModel
from service.engine.plan import ExplainPlan
from service.runtime.jobs import (
    ExplainJob,
    ExplainOutcome,
    MapEncoding,
    OutputOptions,
    PredictJob,
    PredictOutcome,
)
from service.runtime.runtime import Runtime
from service.serving.budget import check_explain_size

T = TypeVar("T")


class Watch(Protocol):
    """Awaits work for a caller, cancelling it if the caller goes away."""

    def __call__(self, work: Awaitable[T], /) -> Awaitable[T]: ...


async def _unwatched(work: Awaitable[T]) -> T:
    return await work


@dataclass(frozen=True)
class AnswerLimits:
    """Bounds on what an explain answer may hold."""

    max_upsampled_side: int
    max_response_bytes: int


@dataclass(frozen=True)
class Predicted:
    images: list[DecodedImage]
    outcomes: list[PredictOutcome]
    decode_s: float  # per image


@dataclass(frozen=True)
class Explained:
    images: list[DecodedImage]
    outcomes: list[ExplainOutcome]
    decode_s: float  # per image


async def _decode(
    runtime: Runtime,
    model: LoadedModel,
    blobs: Sequence[bytes],
    display: DisplayOptions,
    overlay: bool,
    watch: Watch,
) -> tuple[list[DecodedImage], float]:
    """The uploaded images, decoded off the event loop, and the decode time per image."""
    started = time.perf_counter()
    images = await watch(runtime.decode(blobs, display, model=model.name, overlay=overlay))
    return images, (time.perf_counter() - started) / max(1, len(images))


async def predict(
    runtime: Runtime,
    model: LoadedModel,
    blobs: Sequence[bytes],
    display: DisplayOptions,
    caller: str | None,
    watch: Watch = _unwatched,
) -> Predicted:
    """Classify uploaded images, batched with other callers' images."""
    runtime.check_admission(model.name, len(blobs), caller)
    images, decode_s = await _decode(runtime, model, blobs, display, False, watch)
    jobs = [PredictJob(image=image) for image in images]
    outcomes = await watch(runtime.predict(model.name, jobs, caller))
    return Predicted(images, outcomes, decode_s)


async def explain(
    runtime: Runtime,
    model: LoadedModel,
    blobs: Sequence[bytes],
    display: DisplayOptions,
    plan: ExplainPlan,
    outputs: OutputOptions,
    encoding: MapEncoding,
    limits: AnswerLimits,
    caller: str | None,
    watch: Watch = _unwatched,
) -> Explained:
    """Explain uploaded images as ``plan`` says, with ``outputs``' renderings, batched with
    other callers' images; an answer estimated past ``limits`` is refused before any model
    work."""
    runtime.check_admission(model.name, len(blobs), caller)
    overlay = outputs.overlay != "none"
    images, decode_s = await _decode(runtime, model, blobs, display, overlay, watch)
    check_explain_size(
        model,
        plan,
        outputs,
        encoding,
        images,
        max_upsampled_side=limits.max_upsampled_side,
        limit=limits.max_response_bytes,
    )
    jobs = [ExplainJob(image=image, plan=plan, outputs=outputs) for image in images]
    outcomes = await watch(runtime.explain(model.name, jobs, caller))
    return Explained(images, outcomes, decode_s)
