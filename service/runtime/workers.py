"""Model workers: each replica of a model drains the model's batcher in a thread of its own.

A served model has one :class:`~service.runtime.batching.Batcher` of single-image
:class:`WorkItem`\\ s and one worker loop per replica. The loop hands each homogeneous group
(predict, or explain with one method and post-processing) to :func:`run_group` in the replica's
own thread, so the event loop never runs a model. A failure fails only its group: domain errors
reach their callers as they are, anything else as a :class:`WorkerError` that leaks nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from service.engine.cam.explain import CamMap, ImageRequest, PostProcess, explain, predict
from service.engine.faithfulness.scores import ScoreOptions, score_maps
from service.engine.models.loaded import LoadedModel
from service.errors import ServiceError, WorkerError
from service.metrics import Metrics
from service.runtime.batching import Batcher
from service.runtime.config import RuntimeConfig
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

    def group_key(self) -> Hashable:
        """Items with equal keys can share one engine call."""
        if self.kind == "predict":
            return ("predict",)
        return ("explain", self.method, self.post, self.scores)


@dataclass
class Computed:
    """What a worker returns for one item."""

    probabilities: np.ndarray  # (num_classes,) float32
    maps: list[CamMap]


def run_group(
    replica: LoadedModel, group: list[WorkItem], config: RuntimeConfig
) -> list[Computed | BaseException]:
    """Run one homogeneous group on a replica (in the replica's own thread)."""
    try:
        return list(run_batch(replica, group, config))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(group) == 1:
            raise
    # Out of memory on a batch: run its images one at a time so each caller gets its own fate.
    results: list[Computed | BaseException] = []
    for item in group:
        try:
            results.append(run_batch(replica, [item], config)[0])
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            results.append(exc)
    return results


def run_batch(replica: LoadedModel, group: list[WorkItem], config: RuntimeConfig) -> list[Computed]:
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
        perturbation_batch_size=config.perturbation_batch_size,
    )
    if group[0].scores is not None:
        score_maps(
            replica, inputs, result.maps, group[0].scores, batch_size=config.score_batch_size
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
        self.batcher: Batcher[WorkItem, Computed] = Batcher(
            max_batch_size=config.max_batch_size,
            max_batch_wait_s=config.max_batch_wait_ms / 1000.0,
            max_queue_size=config.max_queue_size,
            max_queued_per_lane=config.max_queued_per_caller,
            max_wait_s=config.max_queue_wait_ms / 1000.0,
            group_key=WorkItem.group_key,
            on_group=self._observe,
        )
        metrics.queue_depth.labels(name).set_function(lambda: self.batcher.depth)
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
            try:
                results = await loop.run_in_executor(
                    executor, run_group, replica, group, self._config
                )
            except ServiceError:
                raise
            except Exception as exc:
                raise self._worker_error(exc, len(group)) from None
            return [self._worker_error(r, 1) if isinstance(r, Exception) else r for r in results]

        return handle

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
