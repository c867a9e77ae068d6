"""Loading models onto devices: which devices, how many replicas, and each model's state."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from service.engine.cam.explain import predict
from service.engine.loading import load_model, resolve_device
from service.engine.models.loaded import LoadedModel
from service.engine.models.spec import ModelSpec
from service.runtime.config import RuntimeConfig

logger = logging.getLogger(__name__)

ModelState = Literal["loading", "ready", "failed"]
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class ModelStatus:
    state: ModelState = "loading"
    error: str | None = None
    replicas: int = 0


def devices(setting: str) -> list[torch.device]:
    """The devices replicas go on: every GPU for ``auto``/``cuda`` when CUDA is there, else the
    one device named (raises :class:`~service.errors.ModelLoadError` if it is unusable)."""
    device = resolve_device(setting)
    if device.type == "cuda" and setting in ("auto", "cuda"):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


@dataclass(frozen=True)
class Replica:
    """A model resident on its device, and the one thread that ever runs its torch work.

    Loading (layer discovery, warm-up) and every batch run in that thread: torch's OpenMP
    threads are per calling thread, and a second thread that has run torch makes both slower
    (an explain measured 59 ms against 39 ms on 2 cores once a loader thread had warmed the
    model up and a worker thread ran it).
    """

    model: LoadedModel
    thread: ThreadPoolExecutor
    pass_s: float | None = None  # one image's forward pass, timed after the warm-up


def time_forward_pass(model: LoadedModel) -> float:
    """Seconds of one image's forward pass on the model's device (after its warm-up): the
    first estimate of what a long job's chunk costs, before any is measured."""
    inputs = torch.zeros(1, model.preprocessing.channels, *model.input_size, device=model.device)
    started = time.perf_counter()
    predict(model, inputs)
    return time.perf_counter() - started


async def load_replicas(
    spec: ModelSpec, on: list[torch.device], config: RuntimeConfig
) -> list[Replica]:
    """``config.workers_per_device`` replicas of ``spec`` on each device, each loaded in the
    thread that will run it. On failure the threads already made are released."""
    loop = asyncio.get_running_loop()
    autocast = AUTOCAST_DTYPES[config.autocast]
    replicas: list[Replica] = []
    try:
        for device in on:
            for _ in range(config.workers_per_device):
                started = time.perf_counter()
                thread = ThreadPoolExecutor(
                    1, thread_name_prefix=f"gradcam-{spec.name}-{len(replicas)}"
                )
                try:
                    if config.torch_threads is not None:  # the calling thread's, and new threads'
                        await loop.run_in_executor(
                            thread, torch.set_num_threads, config.torch_threads
                        )
                    model = await loop.run_in_executor(
                        thread, partial(load_model, spec, device, autocast_dtype=autocast)
                    )
                    pass_s = await loop.run_in_executor(thread, time_forward_pass, model)
                except BaseException:
                    thread.shutdown(wait=False)
                    raise
                replicas.append(Replica(model, thread, pass_s))
                logger.info(
                    "model %s replica %d loaded on %s in %.1fs (weights: %s%s)",
                    spec.name,
                    len(replicas),
                    device,
                    time.perf_counter() - started,
                    model.weights.source,
                    ", RANDOM" if model.weights.random else "",
                )
    except BaseException:
        for replica in replicas:
            replica.thread.shutdown(wait=False)
        raise
    return replicas
