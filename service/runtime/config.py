"""Runtime settings as plain data; the HTTP layer's Settings map onto this."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from service.engine.images import ImageLimits

AutocastMode = Literal["none", "bf16", "fp16"]


@dataclass(frozen=True)
class RuntimeConfig:
    """How models are placed and how work is batched, bounded and timed out."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers_per_device: int = 1  # model replicas per device, each owned by one worker thread
    cpu_workers: int = 2  # threads for decoding, preprocessing and rendering
    max_batch_size: int = 8  # images per worker batch
    max_batch_wait_ms: float = 5.0  # how long a batch waits to fill once its first image is in
    max_queue_size: int = 64  # images waiting per model; past it callers get 429
    request_timeout_s: float = 60.0  # per request deadline; past it callers get 504
    autocast: AutocastMode = "none"  # mixed precision on CUDA
    scorecam_max_forward_passes: int = 4096
    scorecam_batch_size: int = 32
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        checks = {
            "workers_per_device": self.workers_per_device >= 1,
            "cpu_workers": self.cpu_workers >= 1,
            "max_batch_size": self.max_batch_size >= 1,
            "max_batch_wait_ms": self.max_batch_wait_ms >= 0,
            "max_queue_size": self.max_queue_size >= 1,
            "request_timeout_s": self.request_timeout_s > 0,
            "scorecam_max_forward_passes": self.scorecam_max_forward_passes >= 1,
            "scorecam_batch_size": self.scorecam_batch_size >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid runtime settings: {', '.join(bad)} out of range")
