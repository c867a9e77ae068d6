"""Loading models onto devices: which devices, how many replicas, and each model's state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelState = Literal["loading", "ready", "failed"]


@dataclass
class ModelStatus:
    state: ModelState = "loading"
    error: str | None = None
    replicas: int = 0
