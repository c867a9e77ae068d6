"""What ``gradcam-service evaluate`` compares, and how: its options as the command resolved them."""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.faithfulness.scores import ScoreOptions


@dataclass(frozen=True)
class EvaluateOptions:
    """What to compare, and how."""

    layers: tuple[str, ...]  # resolved layer names
    methods: tuple[str, ...]
    scores: ScoreOptions | None = None
    pointing_tolerance: float = 0.0  # pixels of the image
    rank_by: str | None = None
    batch_size: int = 8
    score_batch_size: int = 32
    thumbnails: int = 6  # images shown per (layer, method) in the HTML page
