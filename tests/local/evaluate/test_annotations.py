"""The labels file's masks: an object given as a mask image is measured as boxes covering the same
pixels are."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ShapesFolder = Callable[..., tuple[Path, Path]]
RunEvaluate = Callable[..., int]
ReportTable = Callable[[str], list[dict[str, str]]]


def test_masks_measure_the_object_as_boxes_covering_the_same_pixels_do(
    run_evaluate: RunEvaluate,
    report_table: ReportTable,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
) -> None:
    folder, labels = shapes_folder(6, 23)
    entries = json.loads(labels.read_text())
    masks = labels.parent / "masks"
    masks.mkdir()
    for name, entry in entries.items():
        ((left, top, right, bottom),) = entry["boxes"]
        with Image.open(folder / name) as image:
            width, height = image.size
        centres_x = np.arange(width) + 0.5
        centres_y = np.arange(height) + 0.5
        inside = ((centres_y >= top) & (centres_y <= bottom))[:, None] & (
            (centres_x >= left) & (centres_x <= right)
        )[None]
        Image.fromarray((inside * 255).astype(np.uint8)).save(masks / name)
    by_mask = labels.parent / "by_mask.json"
    by_mask.write_text(
        json.dumps(
            {name: {"label": e["label"], "mask": f"masks/{name}"} for name, e in entries.items()}
        )
    )
    options = ("--layer", "layer2", "--layer", "layer3", "--scores", "none")
    assert run_evaluate(shapes_models_file, folder, labels, tmp_path / "boxes", *options) == 0
    assert run_evaluate(shapes_models_file, folder, by_mask, tmp_path / "masks", *options) == 0
    measured = ("layer", "pointing_game", "energy_in_box")
    boxes_rows = report_table((tmp_path / "boxes" / "report.md").read_text())
    mask_rows = report_table((tmp_path / "masks" / "report.md").read_text())
    assert [[row[c] for c in measured] for row in mask_rows] == [
        [row[c] for c in measured] for row in boxes_rows
    ]
    assert any(float(row["energy_in_box"]) > 0 for row in mask_rows)
