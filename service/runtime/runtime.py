"""The serving runtime: resident model replicas, cross-request batching, backpressure, deadlines.

Layout of the work:

- the event loop only routes: it never runs a model or touches pixels;
- a CPU thread pool decodes uploads, preprocesses them and renders overlays, so the accelerator
  does not wait on Python glue;
- each model has one bounded queue of single-image work items; each of its replicas (one per
  device by default) is owned by one worker that takes a batch off the queue when it is full or
  its wait budget is spent, runs it in the replica's own thread, and hands every caller exactly
  its own results. An exception fails only the callers of that batch; the worker carries on.

Past the queue bound callers get :class:`OverloadedError` (429 with Retry-After) instead of
unbounded latency; past the per-request deadline :class:`DeadlineExceededError` (504), and their
queued items are dropped before they cost compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, TypeVar

import numpy as np
import torch

from service.engine.explain import (
    CamMap,
    ExplainResult,
    ImageRequest,
    PostProcess,
    check_scorecam_cost,
    explain,
    predict,
)
from service.engine.images import DecodedImage, decode_image
from service.engine.models import LoadedModel, load_model, resolve_device
from service.engine.preprocess import Geometry, map_to_original, preprocess
from service.engine.render import MEDIA_TYPES, encode_image, overlay, render_panel
from service.engine.spec import ModelSpec
from service.errors import (
    DeadlineExceededError,
    ModelNotReadyError,
    OverloadedError,
    ServiceError,
    UnknownModelError,
    WorkerError,
)
from service.metrics import Metrics
from service.runtime.config import RuntimeConfig
from service.runtime.loading import ModelStatus
from service.runtime.jobs import (
    ExplainJob,
    ExplainOutcome,
    PredictJob,
    PredictOutcome,
    RenderedMap,
    Timings,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Overlays are drawn on the upload scaled to at most this many pixels on a side.
OVERLAY_MAX_SIDE = 1024


@dataclass(eq=False)
class _WorkItem:
    """One image waiting for a worker."""

    kind: Literal["predict", "explain"]
    tensor: torch.Tensor
    future: asyncio.Future[object]
    enqueued: float
    request: ImageRequest | None = None
    method: str = "gradcam"
    post: PostProcess = field(default_factory=PostProcess)

    def group_key(self) -> tuple[object, ...]:
        if self.kind == "predict":
            return ("predict",)
        return ("explain", self.method, self.post)


@dataclass
class _Computed:
    """What a worker returns for one item."""

    probabilities: np.ndarray
    maps: list[CamMap]
    batch_size: int
    queue_s: float
    compute_s: float


class _ModelQueue:
    def __init__(self, name: str, max_size: int) -> None:
        self.name = name
        self.max_size = max_size
        self.queue: asyncio.Queue[_WorkItem | None] = asyncio.Queue()
        self.depth = 0  # live items waiting (the asyncio queue is unbounded; we bound it here)
        self.replicas: list[LoadedModel] = []
        self.workers: list[asyncio.Task[None]] = []
        self.executors: list[ThreadPoolExecutor] = []
        self.batch_seconds = 0.0  # EWMA of batch duration, for Retry-After
        self.preparing = 0  # requests being preprocessed: images about to arrive


class Runtime:
    """Owns the models and the worker pool; the HTTP layer calls its coroutines."""

    def __init__(self, specs: Sequence[ModelSpec], config: RuntimeConfig, metrics: Metrics) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        self._specs = list(specs)
        self._config = config
        self._metrics = metrics
        self._status = {spec.name: ModelStatus() for spec in specs}
        self._queues: dict[str, _ModelQueue] = {}
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

    def _devices(self) -> list[torch.device]:
        device = resolve_device(self._config.device)
        if device.type == "cuda" and self._config.device in ("auto", "cuda"):
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [device]

    async def _load_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            devices = self._devices()
        except ServiceError as exc:
            for status in self._status.values():
                status.state, status.error = "failed", exc.detail
            logger.error("no usable device: %s", exc.detail)
            return
        autocast = _AUTOCAST[self._config.autocast]
        for spec in self._specs:
            status = self._status[spec.name]
            mq = _ModelQueue(spec.name, self._config.max_queue_size)
            try:
                for device in devices:
                    for _ in range(self._config.workers_per_device):
                        started = time.perf_counter()
                        replica = await loop.run_in_executor(
                            None, partial(load_model, spec, device, autocast_dtype=autocast)
                        )
                        mq.replicas.append(replica)
                        logger.info(
                            "model %s replica %d loaded on %s in %.1fs (weights: %s%s)",
                            spec.name,
                            len(mq.replicas),
                            device,
                            time.perf_counter() - started,
                            replica.weights.source,
                            ", RANDOM" if replica.weights.random else "",
                        )
            except Exception as exc:
                status.state = "failed"
                status.error = exc.detail if isinstance(exc, ServiceError) else type(exc).__name__
                logger.exception("model %s failed to load", spec.name)
                continue
            for index, replica in enumerate(mq.replicas):
                executor = ThreadPoolExecutor(1, thread_name_prefix=f"gradcam-{spec.name}-{index}")
                mq.executors.append(executor)
                mq.workers.append(
                    asyncio.create_task(
                        self._worker(mq, replica, executor), name=f"worker-{spec.name}-{index}"
                    )
                )
            self._queues[spec.name] = mq
            status.replicas = len(mq.replicas)
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
        for mq in self._queues.values():
            for _ in mq.workers:
                mq.queue.put_nowait(None)  # after every queued item: FIFO drains first
        for mq in self._queues.values():
            await asyncio.gather(*mq.workers, return_exceptions=True)
            for executor in mq.executors:
                executor.shutdown(wait=True)
        self._cpu.shutdown(wait=True)

    # ----------------------------------------------------------------- lookups

    def model(self, name: str) -> LoadedModel:
        """The first replica of a ready model (for metadata and validation)."""
        status = self._status.get(name)
        if status is None:
            raise UnknownModelError(
                f"There is no model named '{name}'.",
                allowed=[spec.name for spec in self._specs],
            )
        if status.state != "ready" or self._closing:
            reason = status.error if status.state == "failed" else status.state
            if self._closing:
                reason = "the service is shutting down"
            raise ModelNotReadyError(f"Model '{name}' is not ready ({reason}).", retry_after_s=5.0)
        return self._queues[name].replicas[0]

    # ----------------------------------------------------------------- CPU pool

    async def _on_cpu(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)

    async def decode(self, blobs: Sequence[bytes]) -> list[DecodedImage]:
        """Decode uploads in the CPU pool; an error names the image it concerns."""
        limits = self._config.image_limits

        async def one(index: int, blob: bytes) -> DecodedImage:
            try:
                return await self._on_cpu(lambda: decode_image(blob, limits))
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

    async def predict(self, model: str, jobs: Sequence[PredictJob]) -> list[PredictOutcome]:
        """Classify images; batched with other callers' images."""
        return await self._deadline(model, self._predict(model, jobs))

    async def explain(self, model: str, jobs: Sequence[ExplainJob]) -> list[ExplainOutcome]:
        """Explain images; batched with other callers' images."""
        return await self._deadline(model, self._explain(model, jobs))

    async def _deadline(self, model: str, work: Coroutine[object, object, T]) -> T:
        if self._closing:
            work.close()
            raise ModelNotReadyError("The service is shutting down.", retry_after_s=5.0)
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

    async def _prepare(
        self, model: LoadedModel, images: Sequence[DecodedImage]
    ) -> tuple[list[torch.Tensor], list[Geometry], float]:
        started = time.perf_counter()
        cfg = model.preprocessing
        mq = self._queues[model.name]
        mq.preparing += 1
        try:
            prepared = await asyncio.gather(
                *(self._on_cpu(partial(preprocess, image.image, cfg)) for image in images)
            )
        finally:
            # The caller queues its items right after, with no await in between.
            mq.preparing -= 1
        seconds = (time.perf_counter() - started) / max(1, len(images))
        return [t for t, _ in prepared], [g for _, g in prepared], seconds

    async def _predict(self, name: str, jobs: Sequence[PredictJob]) -> list[PredictOutcome]:
        model = self.model(name)
        tensors, geometries, prep_s = await self._prepare(model, [j.image for j in jobs])
        items = [
            _WorkItem("predict", tensor, asyncio.get_running_loop().create_future(), 0.0)
            for tensor in tensors
        ]
        computed = await self._submit(name, items)
        return [
            PredictOutcome(
                probabilities=c.probabilities,
                geometry=geometry,
                timings=Timings(
                    preprocess=prep_s,
                    queue=c.queue_s,
                    compute=c.compute_s,
                    batch_size=c.batch_size,
                ),
            )
            for c, geometry in zip(computed, geometries, strict=True)
        ]

    async def _explain(self, name: str, jobs: Sequence[ExplainJob]) -> list[ExplainOutcome]:
        model = self.model(name)
        scorecam = [
            job.layers or (model.default_layer,) for job in jobs if job.method == "scorecam"
        ]
        check_scorecam_cost(model, scorecam, self._config.scorecam_max_forward_passes)
        tensors, geometries, prep_s = await self._prepare(model, [j.image for j in jobs])
        loop = asyncio.get_running_loop()
        items = [
            _WorkItem(
                "explain",
                tensor,
                loop.create_future(),
                0.0,
                request=ImageRequest(
                    layers=job.layers or (model.default_layer,),
                    targets=job.targets,
                    top_k=job.top_k,
                ),
                method=job.method,
                post=job.post,
            )
            for tensor, job in zip(tensors, jobs, strict=True)
        ]
        computed = await self._submit(name, items)

        async def render(job: ExplainJob, c: _Computed, geometry: Geometry) -> ExplainOutcome:
            started = time.perf_counter()
            maps = await self._on_cpu(lambda: _render(model, job, c, geometry))
            timings = Timings(
                preprocess=prep_s,
                queue=c.queue_s,
                compute=c.compute_s,
                render=time.perf_counter() - started,
                batch_size=c.batch_size,
            )
            return ExplainOutcome(c.probabilities, geometry, maps, timings)

        return list(
            await asyncio.gather(
                *(render(j, c, g) for j, c, g in zip(jobs, computed, geometries, strict=True))
            )
        )

    async def _submit(self, name: str, items: list[_WorkItem]) -> list[_Computed]:
        """Queue a request's items together, or refuse them all; await their results."""
        mq = self._queues.get(name)
        if mq is None:
            raise ModelNotReadyError(f"Model '{name}' is not ready.", retry_after_s=5.0)
        if mq.depth + len(items) > mq.max_size:
            self._metrics.rejected_total.labels(name, "overloaded").inc(len(items))
            batches_ahead = math.ceil((mq.depth + len(items)) / self._config.max_batch_size)
            retry = max(1.0, math.ceil(batches_ahead * mq.batch_seconds / len(mq.workers)))
            raise OverloadedError(
                f"Model '{name}' has {mq.depth} images queued (limit {mq.max_size}); retry"
                f" after {retry:g} s.",
                retry_after_s=retry,
            )
        now = time.perf_counter()
        for item in items:
            item.enqueued = now
            mq.queue.put_nowait(item)
        mq.depth += len(items)
        self._metrics.queue_depth.labels(name).set(mq.depth)
        try:
            results = await asyncio.gather(*(item.future for item in items))
        finally:
            for item in items:
                item.future.cancel()  # no-op when done; drops still-queued work otherwise
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------- workers

    async def _next_batch(self, mq: _ModelQueue) -> list[_WorkItem] | None:
        """Block for one item, then fill up to the batch size until the wait budget is spent.

        The budget is only spent while more images are on their way (requests being
        preprocessed); a lone request is dispatched at once instead of waiting for company.
        """
        first = await mq.queue.get()
        if first is None:
            return None
        batch = [first]
        budget = self._config.max_batch_wait_ms / 1000.0
        deadline = time.perf_counter() + budget
        stop = False
        while len(batch) < self._config.max_batch_size:
            try:
                item = mq.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or mq.preparing == 0:
                    break
                try:
                    item = await asyncio.wait_for(mq.queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                stop = True
                break
            batch.append(item)
        if stop:
            mq.queue.put_nowait(None)  # hand the stop signal on once this batch is done
        return batch

    async def _worker(
        self, mq: _ModelQueue, replica: LoadedModel, executor: ThreadPoolExecutor
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(mq)
            if batch is None:
                return
            mq.depth -= len(batch)
            self._metrics.queue_depth.labels(mq.name).set(mq.depth)
            live = [item for item in batch if not item.future.done()]
            groups: dict[tuple[object, ...], list[_WorkItem]] = {}
            for item in live:
                groups.setdefault(item.group_key(), []).append(item)
            for group in groups.values():
                group = [item for item in group if not item.future.done()]
                if not group:
                    continue
                started = time.perf_counter()
                kind = group[0].kind
                try:
                    results = await loop.run_in_executor(
                        executor, _run_group, replica, group, self._config
                    )
                except Exception as exc:
                    self._fail(mq.name, group, exc)
                    continue
                finally:
                    seconds = time.perf_counter() - started
                    mq.batch_seconds = 0.8 * mq.batch_seconds + 0.2 * seconds
                    self._metrics.batch_size.labels(mq.name, kind).observe(len(group))
                    self._metrics.batch_duration_seconds.labels(mq.name, kind).observe(seconds)
                for item, (probabilities, maps) in zip(group, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(
                            _Computed(
                                probabilities=probabilities,
                                maps=maps,
                                batch_size=len(group),
                                queue_s=started - item.enqueued,
                                compute_s=seconds,
                            )
                        )

    def _fail(self, model: str, group: list[_WorkItem], exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            error: ServiceError = exc
        elif isinstance(exc, torch.cuda.OutOfMemoryError):
            error = WorkerError(
                "The device ran out of memory for this batch; retry with fewer or smaller images.",
                code="out_of_memory",
            )
        else:
            error = WorkerError(
                "The computation failed inside a worker; the request can be retried."
            )
        if not isinstance(exc, ServiceError):
            logger.error(
                "model %s: batch of %d failed", model, len(group), exc_info=(type(exc), exc, None)
            )
            self._metrics.worker_errors_total.labels(model, type(exc).__name__).inc()
        for item in group:
            if not item.future.done():
                item.future.set_exception(error)


def _run_group(
    replica: LoadedModel, group: list[_WorkItem], config: RuntimeConfig
) -> list[tuple[np.ndarray, list[CamMap]]]:
    """Run one homogeneous batch on a replica (in the replica's own thread)."""
    try:
        return _run_batch(replica, group, config)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(group) == 1:
            raise
    # Out of memory on a batch: run its images one at a time so each caller gets its own fate.
    results: list[tuple[np.ndarray, list[CamMap]]] = []
    for item in group:
        results.append(_run_batch(replica, [item], config)[0])
    return results


def _run_batch(
    replica: LoadedModel, group: list[_WorkItem], config: RuntimeConfig
) -> list[tuple[np.ndarray, list[CamMap]]]:
    inputs = torch.stack([item.tensor for item in group]).to(replica.device)
    if group[0].kind == "predict":
        probabilities = predict(replica, inputs)
        return [(probabilities[i], []) for i in range(len(group))]
    requests = [item.request for item in group]
    assert all(r is not None for r in requests)
    result: ExplainResult = explain(
        replica,
        inputs,
        requests,  # type: ignore[arg-type]
        method=group[0].method,
        post=group[0].post,
        scorecam_batch_size=config.scorecam_batch_size,
    )
    return [(result.probabilities[i], list(result.maps[i])) for i in range(len(group))]


def _overlay_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _render(
    model: LoadedModel, job: ExplainJob, computed: _Computed, geometry: Geometry
) -> list[RenderedMap]:
    """Upsampled maps and overlays for one image (CPU pool)."""
    options = job.outputs
    image = job.image.image
    rendered: list[RenderedMap] = []
    overlay_image: np.ndarray | None = None
    overlay_geometry = geometry
    if options.overlay != "none":
        width, height = _overlay_size(image.width, image.height, OVERLAY_MAX_SIDE)
        shown = image if (width, height) == image.size else image.resize((width, height))
        overlay_image = np.asarray(shown)
        overlay_geometry = geometry.resized(width, height)
    for cam in computed.maps:
        out = RenderedMap(cam=cam)
        if options.upsampled == "input":
            out.upsampled = cam.input_map
        elif options.upsampled == "original":
            out.upsampled = map_to_original(cam.grid_normalized, geometry)
        if overlay_image is not None:
            heat = map_to_original(cam.grid_normalized, overlay_geometry)
            if options.overlay == "panel":
                label = model.labels[cam.target]
                title = f"{label} ({cam.probability:.1%}) | {cam.layer} | {cam.method}"
                picture = render_panel(
                    overlay_image, heat, colormap=options.colormap, alpha=options.alpha, title=title
                )
                fmt = "png"
            else:
                picture = overlay(
                    overlay_image, heat, colormap=options.colormap, alpha=options.alpha
                )
                fmt = options.overlay
            out.overlay = encode_image(picture, fmt)
            out.overlay_media_type = MEDIA_TYPES[fmt]
            out.overlay_size = (int(picture.shape[1]), int(picture.shape[0]))
        rendered.append(out)
    return rendered
