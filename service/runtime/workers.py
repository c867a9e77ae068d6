"""Model workers: each replica of a model drains the model's batcher in a thread of its own.

A served model has one :class:`~service.runtime.batching.Batcher` of single-image
:class:`WorkItem`\\ s and one worker loop per replica. The loop hands each homogeneous group
(predict, or explain with one method and post-processing) to :func:`run_group` in the replica's
own thread, so the event loop never runs a model. A failure fails only its group: domain errors
reach their callers as they are, anything else as a :class:`WorkerError` that leaks nothing.

Long jobs (a method that runs the model on perturbed inputs, the faithfulness scores) run alone
and in slices (:mod:`~service.runtime.pacing`): between two chunks they stop if nobody waits
for them, and lend the replica's thread to one batch of the other callers' work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from service.engine.cam.costs import Checkpoint, Cost, WorkAbandoned, no_checkpoint
from service.engine.cam.explain import CamMap, ImageRequest, PostProcess, explain, predict
from service.engine.faithfulness.scores import ScoreOptions, score_maps
from service.engine.models.loaded import LoadedModel
from service.errors import ServiceError, WorkerError
from service.metrics import Metrics
from service.runtime.batching import Batcher
from service.runtime.config import RuntimeConfig
from service.runtime.pacing import Lent, Pace, Slicer
from service.runtime.replicas import Replica

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkItem:
    """One preprocessed image waiting for a worker."""

    kind: Literal["predict", "explain"]
    tensor: torch.Tensor
    request: ImageRequest = field(default_factory=ImageRequest)
    method: str = "gradcam"
    post: PostProcess = field(default_factory=PostProcess)
    scores: ScoreOptions | None = None
    cost: Cost = field(default_factory=Cost)  # declared work on top of its forward pass
    long: bool = False  # a long job (ExplainPlan.long): run alone and in slices

    def group_key(self) -> Hashable:
        """Items with equal keys can share one engine call."""
        if self.kind == "predict":
            return ("predict",)
        return ("explain", self.method, self.post, self.scores)

    def warm_key(self) -> Hashable:
        """The kind of work whose first call on a replica pays one-time costs."""
        return (self.kind, self.method)


@dataclass
class Computed:
    """What a worker returns for one item."""

    probabilities: np.ndarray  # (num_classes,) float32
    maps: list[CamMap]


@dataclass(frozen=True)
class ModelWork:
    """What a model's workers are busy with now."""

    queued: int  # images waiting for a worker, long jobs included
    long_running: int  # long jobs (Score-CAM, scores) running now
    long_queued: int
    long_remaining_s: float  # predicted seconds of what remains of them
    forward_pass_s: float | None  # measured seconds per forward pass in a long job's chunk


@dataclass(frozen=True)
class Chunks:
    """How a group's costly work is chunked and checked between chunks."""

    checkpoint: Checkpoint = no_checkpoint
    perturbation_batch_size: int | None = None  # None: the configured batch
    score_batch_size: int | None = None


def run_group(
    replica: LoadedModel, group: list[WorkItem], config: RuntimeConfig, chunks: Chunks = Chunks()
) -> list[Computed | BaseException]:
    """Run one homogeneous group on a replica (in the replica's own thread)."""
    try:
        return list(run_batch(replica, group, config, chunks))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(group) == 1:
            raise
    # Out of memory on a batch: run its images one at a time so each caller gets its own fate.
    results: list[Computed | BaseException] = []
    for item in group:
        try:
            results.append(run_batch(replica, [item], config, chunks)[0])
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            results.append(exc)
    return results


def run_batch(
    replica: LoadedModel, group: list[WorkItem], config: RuntimeConfig, chunks: Chunks = Chunks()
) -> list[Computed]:
    """One engine call for the whole group (and its scores, when it asks for any)."""
    inputs = torch.stack([item.tensor for item in group]).to(replica.device)
    if group[0].kind == "predict":
        probabilities = predict(replica, inputs)
        return [Computed(probabilities[i], []) for i in range(len(group))]
    result = explain(
        replica,
        inputs,
        [item.request for item in group],
        method=group[0].method,
        post=group[0].post,
        perturbation_batch_size=chunks.perturbation_batch_size or config.perturbation_batch_size,
        checkpoint=chunks.checkpoint,
    )
    if group[0].scores is not None:
        score_maps(
            replica,
            inputs,
            result.maps,
            group[0].scores,
            batch_size=chunks.score_batch_size or config.score_batch_size,
            checkpoint=chunks.checkpoint,
        )
    return [Computed(result.probabilities[i], list(result.maps[i])) for i in range(len(group))]


class ServedModel:
    """A model's batcher, its replicas and one worker loop per replica."""

    def __init__(
        self, name: str, replicas: list[Replica], config: RuntimeConfig, metrics: Metrics
    ) -> None:
        self.name = name
        self.replicas = [replica.model for replica in replicas]
        self._config = config
        self._metrics = metrics
        timed = [replica.pass_s for replica in replicas if replica.pass_s is not None]
        self.pace = Pace(pass_s=max(timed, default=None))
        self.batcher: Batcher[WorkItem, Computed] = Batcher(
            max_batch_size=config.max_batch_size,
            max_batch_wait_s=config.max_batch_wait_ms / 1000.0,
            max_queue_size=config.max_queue_size,
            max_queued_per_lane=config.max_queued_per_caller,
            max_wait_s=config.max_queue_wait_ms / 1000.0,
            group_key=WorkItem.group_key,
            warm_key=WorkItem.warm_key,
            on_group=self._observe,
            solo=lambda item: item.long,
            solo_seconds=lambda item: self.pace.seconds(item.cost, 1),
            slice_s=config.work_slice_ms / 1000.0,
            item_seconds=self.pace.pass_s or 0.0,  # until a warmed-up batch is measured
        )
        metrics.queue_depth.labels(name).set_function(lambda: self.batcher.depth)
        metrics.long_jobs.labels(name, "running").set_function(lambda: self.batcher.solo_running)
        metrics.long_jobs.labels(name, "queued").set_function(lambda: self.batcher.solo_queued)
        metrics.long_job_remaining_seconds.labels(name).set_function(self.batcher.solo_backlog_s)
        self._executors = [replica.thread for replica in replicas]
        self._loops = [
            asyncio.create_task(
                self.batcher.run(self._handler(replica.model, replica.thread)),
                name=f"worker-{name}-{i}",
            )
            for i, replica in enumerate(replicas)
        ]

    def _handler(
        self, replica: LoadedModel, executor: ThreadPoolExecutor
    ) -> Callable[[list[WorkItem]], Awaitable[list[Computed | BaseException]]]:
        async def handle(group: list[WorkItem]) -> list[Computed | BaseException]:
            loop = asyncio.get_running_loop()
            chunks = self._slices(replica, group[0], loop) if group[0].long else Chunks()
            return await loop.run_in_executor(executor, self._compute, replica, group, chunks)

        return handle

    def _compute(
        self, replica: LoadedModel, group: list[WorkItem], chunks: Chunks = Chunks()
    ) -> list[Computed | BaseException]:
        """One result per item, never an exception raised (in the replica's thread)."""
        try:
            results = run_group(replica, group, self._config, chunks)
        except WorkAbandoned as exc:
            self._metrics.abandoned_total.labels(self.name).inc()
            return [exc] * len(group)
        except ServiceError as exc:
            return [exc] * len(group)
        except Exception as exc:
            return [self._worker_error(exc, len(group))] * len(group)
        return [self._worker_error(r, 1) if isinstance(r, Exception) else r for r in results]

    def _slices(
        self, replica: LoadedModel, item: WorkItem, loop: asyncio.AbstractEventLoop
    ) -> Chunks:
        """A long job's chunks, about ``work_slice_ms`` each on this device, and its
        checkpoint: stop when nobody waits, serve one batch of the others between chunks."""
        slice_s = self._config.work_slice_ms / 1000.0

        def take_others() -> list[Lent]:
            return [
                ([entry.item for entry in entries], partial(self._file, replica, key, entries))
                for key, entries in self.batcher.take_nowait()
            ]

        slicer = Slicer(
            pace=self.pace,
            wanted=lambda: self.batcher.waited_for(item),
            loop=loop,
            take_others=take_others,
            run_others=lambda items: self._compute(replica, items),
        )
        return Chunks(
            checkpoint=slicer,
            perturbation_batch_size=self.pace.chunk(slice_s, self._config.perturbation_batch_size),
            score_batch_size=self.pace.chunk(slice_s, self._config.score_batch_size),
        )

    def work(self) -> ModelWork:
        """What this model's workers are busy with now."""
        return ModelWork(
            queued=self.batcher.depth,
            long_running=self.batcher.solo_running,
            long_queued=self.batcher.solo_queued,
            long_remaining_s=self.batcher.solo_backlog_s(),
            forward_pass_s=self.pace.pass_s,
        )

    def _file(
        self,
        replica: LoadedModel,
        key: Hashable,
        entries: list[Any],
        results: Any,
        seconds: float,
    ) -> None:
        """File the results of a group lent a long job's worker (on the event loop)."""
        worker = ("lent", id(replica))
        self.batcher.finish(key, entries, entries[0].started, results, seconds, worker)

    def _worker_error(self, exc: Exception, size: int) -> WorkerError:
        logger.error(
            "model %s: batch of %d failed", self.name, size, exc_info=(type(exc), exc, None)
        )
        self._metrics.worker_errors_total.labels(self.name, type(exc).__name__).inc()
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return WorkerError(
                "The device ran out of memory for this batch; retry with fewer or smaller images.",
                code="out_of_memory",
            )
        return WorkerError("The computation failed inside a worker; the request can be retried.")

    def _observe(self, key: Hashable, size: int, seconds: float) -> None:
        kind = key[0] if isinstance(key, tuple) else str(key)
        self._metrics.batch_size.labels(self.name, kind).observe(size)
        self._metrics.batch_duration_seconds.labels(self.name, kind).observe(seconds)

    async def stop(self) -> None:
        """Let the workers finish every queued item, then release their threads."""
        self.batcher.close()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=True)
