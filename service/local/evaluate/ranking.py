"""The ranking of ``gradcam-service evaluate``: each (layer, method)'s measures averaged over
its images, and the pairs ranked, best first, into the :class:`~.report.Report`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.engine.faithfulness.scores import LOWER_IS_BETTER, ScoreOptions
from service.engine.models.loaded import LoadedModel
from service.local.evaluate.annotations import Annotation
from service.local.evaluate.localisation import ENERGY, POINTING
from service.local.evaluate.options import EvaluateOptions
from service.local.evaluate.report import MapThumbnail, Report, Row
from service.local.evaluate.store import Record, Run
from service.local.evaluate.thumbnails import THUMBNAILS_DIR, thumbnail_name


def measured_columns(annotations: dict[str, Annotation], scores: ScoreOptions | None) -> list[str]:
    """The report's measures, known before any image is read (so that ``--rank-by`` is
    checked up front): the pointing game and energy in box where some image has boxes or a
    mask, then the scores asked for."""
    located = any(a.boxes or a.mask is not None for a in annotations.values())
    return ([POINTING, ENERGY] if located else []) + list(scores.names if scores else ())


def ranked_report(
    model: LoadedModel,
    folder: Path,
    files: Sequence[Path],
    options: EvaluateOptions,
    columns: list[str],
    run: Run,
    interrupted: bool,
    command: str,
) -> Report:
    """Aggregate the records by (layer, method) and rank them by ``options.rank_by`` (one of
    ``columns``, checked before the run), else the first column."""
    rank_by = options.rank_by or (columns[0] if columns else None)
    rows = []
    for layer in options.layers:
        for method in options.methods:
            mine = [r for r in run.records if r.layer == layer and r.method == method]
            if not mine:
                continue
            values: dict[str, float | None] = {}
            for column in columns:
                values[column] = _mean([_value(r, column) for r in mine])
            rows.append(
                Row(
                    layer=layer,
                    method=method,
                    images=len(mine),
                    values=values,
                    explain_ms=float(np.median([r.explain_ms for r in mine])),
                    scores_ms=float(np.median([r.scores_ms for r in mine])),
                    thumbnails=[
                        MapThumbnail(
                            image=r.image,
                            path=run.output
                            / THUMBNAILS_DIR
                            / thumbnail_name(layer, method, r.index),
                            pointing=r.pointing,
                            cropped=r.cropped,
                        )
                        for r in sorted(mine, key=lambda r: r.index)
                        if r.index < options.thumbnails
                    ],
                )
            )
    if rank_by is not None:
        sign = 1.0 if rank_by in LOWER_IS_BETTER else -1.0
        secondary = ENERGY if rank_by == POINTING else None
        rows.sort(
            key=lambda row: (
                _key(row.values.get(rank_by), sign),
                _key(row.values.get(secondary), -1.0) if secondary else 0.0,
            )
        )
    return Report(
        model=model.name,
        architecture=model.spec.architecture,
        random_weights=model.weights.random,
        device=str(model.device),
        folder=str(folder),
        images=len(files),
        evaluated=len({r.image for r in run.records}),
        failed=dict(run.failed),
        interrupted=interrupted,
        rank_by=rank_by,
        lower_is_better=sorted(LOWER_IS_BETTER),
        columns=columns,
        rows=rows,
        pointing_tolerance=options.pointing_tolerance,
        command=command,
    )


def _value(record: Record, column: str) -> float | None:
    if column == POINTING:
        return None if record.pointing is None else float(record.pointing)
    if column == ENERGY:
        return record.energy
    return record.scores.get(column)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _key(value: float | None, sign: float) -> float:
    """Sort key: better first, unmeasured last."""
    return math.inf if value is None else sign * value
