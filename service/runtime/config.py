"""Runtime settings as typed data, with the one definition of each setting's bounds.

The HTTP layer's ``Settings`` declares the same settings as ``GRADCAM_*`` variables with these
``Annotated`` types and maps onto :class:`RuntimeConfig`, so a bound is written once and checked
wherever a configuration is made.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from service.engine.imaging.images import ImageLimits

AutocastMode = Literal["none", "bf16", "fp16"]

WorkersPerDevice = Annotated[int, Field(ge=1, le=64)]
CpuWorkers = Annotated[int, Field(ge=1, le=256)]
TorchThreads = Annotated[int, Field(ge=1, le=256)]
BatchSize = Annotated[int, Field(ge=1, le=1024)]
BatchWaitMs = Annotated[float, Field(ge=0, le=10_000)]
QueueSize = Annotated[int, Field(ge=1)]
TimeoutS = Annotated[float, Field(gt=0)]
ForwardPasses = Annotated[int, Field(ge=1)]
MapSide = Annotated[int, Field(ge=16, le=16384)]
WaitMs = Annotated[float, Field(gt=0, le=600_000)]
SliceMs = Annotated[float, Field(ge=10, le=60_000)]


@dataclass(frozen=True)
class RuntimeConfig:
    """How models are placed and how work is batched, bounded and timed out."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers_per_device: WorkersPerDevice = 1  # model replicas per device, one worker thread each
    cpu_workers: CpuWorkers = 2  # threads for decoding, preprocessing and rendering
    # torch's intra-op threads for the replicas' work (set in each replica's thread; threads
    # started later begin with it too); None: torch's default (one per core)
    torch_threads: TorchThreads | None = None
    max_batch_size: BatchSize = 8  # images per worker batch
    max_batch_wait_ms: BatchWaitMs = 5.0  # how long a batch waits to fill once its first is in
    max_queue_size: QueueSize = 64  # images waiting per model; past it callers get 429
    max_queued_per_caller: QueueSize = 32  # images one caller may have waiting per model
    max_queue_wait_ms: WaitMs = 2000.0  # admit only requests predicted to wait less than this
    request_timeout_s: TimeoutS = 60.0  # per request deadline; past it callers get 504
    autocast: AutocastMode = "none"  # mixed precision on CUDA
    # a CAM method's forward passes on perturbed inputs (Score-CAM's masked inputs), per request
    explain_max_forward_passes: ForwardPasses = 4096
    perturbation_batch_size: BatchSize = 32  # perturbed inputs per forward pass of a CAM method
    score_max_forward_passes: ForwardPasses = 16384  # faithfulness scores, per request
    score_max_road_solves: ForwardPasses = 4096  # ROAD's sparse solves (CPU), per request
    score_batch_size: BatchSize = 32  # perturbed inputs per forward pass of the scores
    # A long job (Score-CAM, the scores) runs in chunks of about this long, measured on the
    # device; between two it stops if nobody waits for it, and serves another batch.
    work_slice_ms: SliceMs = 50.0
    max_upsampled_side: MapSide = 1024  # upsampled=original maps are resampled to fit this
    exact_decode: bool = False  # decode every pixel of large uploads (slower; see decode_image)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
