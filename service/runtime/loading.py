"""Loading models onto devices: which devices, how many replicas, and each model's state."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from service.engine.loading import load_model, resolve_device
from service.engine.models import LoadedModel
from service.engine.spec import ModelSpec
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


async def load_replicas(
    spec: ModelSpec, on: list[torch.device], config: RuntimeConfig
) -> list[LoadedModel]:
    """``config.workers_per_device`` replicas of ``spec`` on each device, loaded in a thread."""
    loop = asyncio.get_running_loop()
    autocast = AUTOCAST_DTYPES[config.autocast]
    replicas: list[LoadedModel] = []
    for device in on:
        for _ in range(config.workers_per_device):
            started = time.perf_counter()
            replica = await loop.run_in_executor(
                None, partial(load_model, spec, device, autocast_dtype=autocast)
            )
            replicas.append(replica)
            logger.info(
                "model %s replica %d loaded on %s in %.1fs (weights: %s%s)",
                spec.name,
                len(replicas),
                device,
                time.perf_counter() - started,
                replica.weights.source,
                ", RANDOM" if replica.weights.random else "",
            )
    return replicas
