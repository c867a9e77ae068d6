"""The serving runtime: resident model replicas, cross-request batching, backpressure, deadlines.

Layout of the work:

- the event loop only routes: it never runs a model or touches pixels;
- a CPU thread pool decodes uploads, preprocesses them and renders overlays
  (:mod:`~service.runtime.outputs`), so the accelerator does not wait on Python glue;
- each model has one bounded :class:`~service.runtime.batching.Batcher` of single-image work
  items, drained by one worker per replica (:mod:`~service.runtime.workers`); replicas are
  placed and loaded by :mod:`~service.runtime.replicas`.

Past the queue bound callers get :class:`OverloadedError` (429 with Retry-After) instead of
unbounded latency; past the per-request deadline :class:`DeadlineExceededError` (504), and their
queued items are dropped before they cost compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import torch

from service.engine.cam.costs import Cost
from service.engine.cam.explain import check_explain_cost
from service.engine.cam.methods import get_method
from service.engine.faithfulness.scores import check_score_cost
from service.engine.imaging.dicom_display import DisplayOptions
from service.engine.imaging.images import DecodedImage, ScaleNeeded, decode_image
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import Geometry, PreprocessConfig, preprocess
from service.engine.models.spec import ModelSpec, check_unique_names
from service.engine.plan import ExplainPlan
from service.errors import (
    DeadlineExceededError,
    InvalidParameterError,
    ModelNotReadyError,
    OverloadedError,
    ServiceError,
    UnknownModelError,
)
from service.metrics import Metrics
from service.runtime.batching import Batched, QueueFullError
from service.runtime.config import RuntimeConfig
from service.runtime.jobs import ExplainJob, ExplainOutcome, PredictJob, PredictOutcome, Timings
from service.runtime.outputs import (
    OVERLAY_DECODE_FRACTION,
    OVERLAY_MAX_SIDE,
    fit_within,
    render_maps,
)
from service.runtime.replicas import ModelStatus, devices, load_replicas
from service.runtime.workers import Computed, ModelWork, ServedModel, WorkItem

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Runtime:
    """Owns the models and the worker pool; the HTTP layer calls its coroutines."""

    def __init__(self, specs: Sequence[ModelSpec], config: RuntimeConfig, metrics: Metrics) -> None:
        check_unique_names(specs)
        self._specs = list(specs)
        self._config = config
        self._metrics = metrics
        self._status = {spec.name: ModelStatus() for spec in specs}
        self._served: dict[str, ServedModel] = {}
        self._cpu = ThreadPoolExecutor(config.cpu_workers, thread_name_prefix="gradcam-cpu")
        self._loader: asyncio.Task[None] | None = None
        self._closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Begin loading every model in the background; returns at once."""
        if self._loader is None:
            self._loader = asyncio.create_task(self._load_all(), name="gradcam-model-loader")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every model is ready (True) or loading ended/timed out otherwise."""
        try:
            if self._loader is not None:
                await asyncio.wait_for(asyncio.shield(self._loader), timeout)
        except TimeoutError:
            return False
        return self.ready

    @property
    def ready(self) -> bool:
        return bool(self._status) and all(s.state == "ready" for s in self._status.values())

    def statuses(self) -> dict[str, ModelStatus]:
        return dict(self._status)

    def specs(self) -> list[ModelSpec]:
        return list(self._specs)

    async def _load_all(self) -> None:
        try:
            on = devices(self._config.device)
        except ServiceError as exc:
            for status in self._status.values():
                status.state, status.error = "failed", exc.detail
            logger.error("no usable device: %s", exc.detail)
            return
        for spec in self._specs:
            status = self._status[spec.name]
            try:
                replicas = await load_replicas(spec, on, self._config)
            except Exception as exc:
                status.state = "failed"
                status.error = _load_failure(exc)
                logger.exception("model %s failed to load", spec.name)
                continue
            self._served[spec.name] = ServedModel(spec.name, replicas, self._config, self._metrics)
            status.replicas = len(replicas)
            status.state = "ready"

    async def stop(self) -> None:
        """Refuse new work, finish the requests already accepted, then release the threads."""
        self._closing = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            # Accepted requests end by their deadline at the latest.
            await asyncio.wait_for(self._idle.wait(), self._config.request_timeout_s + 1.0)
        for served in self._served.values():
            await served.stop()
        self._cpu.shutdown(wait=True)

    # ----------------------------------------------------------------- lookups

    def model(self, name: str) -> LoadedModel:
        """The first replica of a ready model (for metadata and validation)."""
        return self._ready(name).replicas[0]

    def work(self, name: str) -> ModelWork:
        """What a ready model's workers are busy with now (queue, long jobs)."""
        return self._ready(name).work()

    def _ready(self, name: str) -> ServedModel:
        status = self._status.get(name)
        if status is None:
            raise UnknownModelError(
                f"There is no model named '{name}'.",
                allowed=[spec.name for spec in self._specs],
            )
        if self._closing:
            raise ModelNotReadyError(f"Model '{name}' is not ready (the service is shutting down).")
        served = self._served.get(name)
        if status.state != "ready" or served is None:
            reason = status.error if status.state == "failed" else status.state
            raise ModelNotReadyError(f"Model '{name}' is not ready ({reason}).")
        return served

    # ----------------------------------------------------------------- CPU pool

    async def _on_cpu(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)

    async def decode(
        self,
        blobs: Sequence[bytes],
        display: DisplayOptions | None = None,
        *,
        model: str | None = None,
        overlay: bool = False,
    ) -> list[DecodedImage]:
        """Decode uploads in the CPU pool (DICOM objects shown with ``display``'s window and
        frame); an error names the image it concerns.

        For ``model``, only the pixels it needs are decoded (unless ``exact_decode``): enough
        for its preprocessing, and for an overlay at display size if ``overlay``.
        """
        limits = self._config.image_limits
        scale = None
        if model is not None and not self._config.exact_decode:
            scale = _scale_needed(self.model(model).preprocessing, overlay)

        async def one(index: int, blob: bytes) -> DecodedImage:
            try:
                return await self._on_cpu(lambda: decode_image(blob, limits, display, scale))
            except ServiceError as exc:
                raise exc.for_image(index) from None

        results = await asyncio.gather(
            *(one(i, blob) for i, blob in enumerate(blobs)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------- requests

    async def predict(
        self, model: str, jobs: Sequence[PredictJob], caller: str | None = None
    ) -> list[PredictOutcome]:
        """Classify images; batched with other callers' images (see :meth:`explain`)."""
        return await self._deadline(model, self._predict(model, jobs, caller))

    async def explain(
        self, model: str, jobs: Sequence[ExplainJob], caller: str | None = None
    ) -> list[ExplainOutcome]:
        """Explain images; batched with other callers' images.

        ``caller`` names who asks (an API key's id, a client address): each caller may hold at
        most ``max_queued_per_caller`` images in a model's queue, and batches take images from
        the callers round-robin.
        """
        return await self._deadline(model, self._explain(model, jobs, caller))

    async def _deadline(self, model: str, work: Coroutine[object, object, T]) -> T:
        if self._closing:
            work.close()
            raise ModelNotReadyError("The service is shutting down.")
        self._in_flight += 1
        self._idle.clear()
        try:
            async with asyncio.timeout(self._config.request_timeout_s):
                return await work
        except TimeoutError:
            self._metrics.rejected_total.labels(model, "deadline").inc()
            raise DeadlineExceededError(
                f"The request did not finish within {self._config.request_timeout_s:g} s; its"
                " remaining work was dropped. Retry later or send fewer images."
            ) from None
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _predict(
        self, name: str, jobs: Sequence[PredictJob], caller: str | None
    ) -> list[PredictOutcome]:
        served = self._ready(name)
        tensors, geometries, prep_s = await self._prepare(served, [j.image for j in jobs], caller)
        computed = await self._submit(served, [WorkItem("predict", t) for t in tensors], caller)
        return [
            PredictOutcome(c.value.probabilities, geometry, _timings(prep_s, c))
            for c, geometry in zip(computed, geometries, strict=True)
        ]

    async def _explain(
        self, name: str, jobs: Sequence[ExplainJob], caller: str | None
    ) -> list[ExplainOutcome]:
        served = self._ready(name)
        model = served.replicas[0]
        for index, job in enumerate(jobs):
            if job.outputs.overlay == "dicom" and job.image.dicom is None:
                raise InvalidParameterError(
                    f"overlay=dicom returns a DICOM object filed under the uploaded object's"
                    f" study and patient, but image {index} is {job.image.format}, not DICOM."
                    " Send a DICOM file, or ask for another overlay.",
                    code="dicom_overlay_needs_dicom",
                    image_index=index,
                )
        plans = [job.plan for job in jobs]
        for method in {plan.method for plan in plans}:
            check_explain_cost(
                model,
                method,
                [plan.request for plan in plans if plan.method == method],
                self._config.explain_max_forward_passes,
            )
        for options in {plan.scores for plan in plans if plan.scores is not None}:
            check_score_cost(
                model,
                [plan.request for plan in plans if plan.scores == options],
                options,
                self._config.score_max_forward_passes,
                self._config.score_max_road_solves,
            )
        costs = [plan.cost(model) for plan in plans]
        self._check_time(served, plans, costs)
        tensors, geometries, prep_s = await self._prepare(served, [j.image for j in jobs], caller)
        items = [
            WorkItem(
                "explain",
                tensor,
                plan.request,
                plan.method,
                plan.post,
                plan.scores,
                cost=cost,
                long=plan.long,
            )
            for tensor, plan, cost in zip(tensors, plans, costs, strict=True)
        ]
        computed = await self._submit(served, items, caller)

        async def render(
            job: ExplainJob, c: Batched[Computed], geometry: Geometry
        ) -> ExplainOutcome:
            started = time.perf_counter()
            maps = await self._on_cpu(
                partial(
                    render_maps,
                    model,
                    job.image,
                    c.value.maps,
                    geometry,
                    job.outputs,
                    job.plan.post,
                    self._config.max_upsampled_side,
                )
            )
            timings = _timings(prep_s, c, render=time.perf_counter() - started)
            return ExplainOutcome(c.value.probabilities, geometry, maps, timings)

        return list(
            await asyncio.gather(
                *(render(j, c, g) for j, c, g in zip(jobs, computed, geometries, strict=True))
            )
        )

    def _check_time(
        self, served: ServedModel, plans: Sequence[ExplainPlan], costs: Sequence[Cost]
    ) -> None:
        """Refuse, before anything is queued, long jobs predicted to outlast the deadline on
        this model's device (from the measured seconds per forward pass and per ROAD solve);
        the pass and solve caps stay as a second, hard bound."""
        long = [(plan, cost) for plan, cost in zip(plans, costs, strict=True) if plan.long]
        if not long:
            return
        pace = served.pace
        seconds = sum(pace.seconds(cost, 1) for _, cost in long)
        deadline = self._config.request_timeout_s
        if seconds <= deadline:
            return
        plan = long[0][0]
        method = get_method(plan.method)
        passes = sum(cost.forward_passes for _, cost in long)
        solves = sum(cost.cpu_solves for _, cost in long)
        work = f"{passes} forward passes at {1000 * (pace.pass_s or 0.0):.0f} ms each"
        if solves:
            work += f" and {solves} ROAD solves"
        raise InvalidParameterError(
            f"This request would take about {seconds:.0f} s on model '{served.name}' ({work},"
            f" as measured on its device); the deadline is {deadline:g} s. Use fewer images,"
            " layers, classes or scores, a layer with fewer channels, or a gradient method.",
            code=method.too_costly_code if method.needs_model else "scores_too_costly",
        )

    async def _prepare(
        self, served: ServedModel, images: Sequence[DecodedImage], caller: str | None
    ) -> tuple[list[torch.Tensor], list[Geometry], float]:
        started = time.perf_counter()
        cfg = served.replicas[0].preprocessing
        # The caller queues its items right after, with no await in between.
        with served.batcher.arriving(len(images), caller):
            prepared = await asyncio.gather(
                *(
                    self._on_cpu(partial(preprocess, image.image, cfg, (image.width, image.height)))
                    for image in images
                )
            )
        seconds = (time.perf_counter() - started) / max(1, len(images))
        return [t for t, _ in prepared], [g for _, g in prepared], seconds

    def check_admission(self, model: str, images: int, caller: str | None = None) -> None:
        """Refuse now (:class:`OverloadedError`) a request that its model's queue would refuse,
        before any work is spent on it; :meth:`predict` and :meth:`explain` check again when
        they queue."""
        served = self._ready(model)
        try:
            wait = served.batcher.admit(images, caller)
        except QueueFullError as full:
            raise self._overloaded(served, full, images) from None
        self._metrics.predicted_wait_seconds.labels(model).set(wait)

    async def _submit(
        self, served: ServedModel, items: list[WorkItem], caller: str | None
    ) -> list[Batched[Computed]]:
        """Queue a request's items together, or refuse them all; await their results."""
        try:
            results = served.batcher.submit(items, caller)
        except QueueFullError as full:
            raise self._overloaded(served, full, len(items)) from None
        self._metrics.admitted_total.labels(served.name).inc(len(items))
        return await results

    def _overloaded(
        self, served: ServedModel, full: QueueFullError, images: int
    ) -> OverloadedError:
        """The 429 for a refused request, counted by reason."""
        self._metrics.predicted_wait_seconds.labels(served.name).set(full.predicted_wait_s)
        if full.scope == "lane":
            reason = code = "caller_limit"
            detail = (
                f"You already have {full.depth} images queued for model '{served.name}'"
                f" (limit {full.limit:g} per caller)"
            )
        elif full.scope == "wait":
            reason, code = "queue_wait", "overloaded"
            detail = (
                f"Model '{served.name}' is busy: this request would wait about"
                f" {full.predicted_wait_s:.1f} s (limit {full.limit:g} s)"
            )
        else:
            reason, code = "overloaded", "overloaded"
            detail = f"Model '{served.name}' has {full.depth} images queued (limit {full.limit:g})"
        self._metrics.rejected_total.labels(served.name, reason).inc(images)
        return OverloadedError(
            f"{detail}; retry after {full.retry_after_s:g} s.",
            code=code,
            retry_after_s=full.retry_after_s,
        )


def _load_failure(exc: Exception) -> str:
    """Why a model failed to load, for /readyz and /v1/models: a domain error's sentence, or an
    unexpected exception's class and the first line of its message (at most 300 characters)."""
    if isinstance(exc, ServiceError):
        return exc.detail
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _scale_needed(preprocessing: PreprocessConfig, overlay: bool) -> ScaleNeeded:
    """The scale an upload must keep: for the model's resize, and for an overlay's display."""

    def needed(width: int, height: int) -> float:
        scale = preprocessing.scale_needed(width, height)
        if overlay:
            shown = fit_within(width, height, OVERLAY_MAX_SIDE)[0] / width
            scale = max(scale, OVERLAY_DECODE_FRACTION * shown)
        return scale

    return needed


def _timings(preprocess_s: float, computed: Batched[Computed], render: float = 0.0) -> Timings:
    return Timings(
        preprocess=preprocess_s,
        queue=computed.queued_s,
        compute=computed.compute_s,
        render=render,
        batch_size=computed.batch_size,
    )
