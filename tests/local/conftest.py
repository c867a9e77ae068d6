"""Fixtures for the local commands: the trained shapes model as a models file, and folders of
its images written as PNG files with a labels file (classes and boxes); ``gradcam-service
evaluate`` run in process, and its report's ranking table read back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.cli import main
from service.engine.models.spec import ModelSpec

ShapesFolder = Callable[..., tuple[Path, Path]]
RunEvaluate = Callable[..., int]
ReportTable = Callable[[str], list[dict[str, str]]]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands read GRADCAM_* like the server: none may leak in from the environment."""
    for name in list(os.environ):
        if name.startswith("GRADCAM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def shapes_models_file(
    tmp_path_factory: pytest.TempPathFactory, shapes_model_spec: ModelSpec
) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.json"
    entry = json.loads(shapes_model_spec.model_dump_json(exclude_none=True))
    path.write_text(json.dumps({"models": [entry]}))
    return path


@pytest.fixture(scope="session")
def shapes_folder(
    tmp_path_factory: pytest.TempPathFactory,
    make_shapes_fn: Callable[[int, torch.Generator], Any],
    shapes_model_spec: ModelSpec,
) -> ShapesFolder:
    """``shapes_folder(count, seed)``: a new folder of ``count`` shape images (PNG) and a labels
    file beside it (``{"shape00.png": {"label": "disk", "boxes": [[l, t, r, b]]}, ...}``)."""
    classes = shapes_model_spec.labels or []

    def make(count: int, seed: int) -> tuple[Path, Path]:
        root = tmp_path_factory.mktemp("shapes")
        folder = root / "images"
        folder.mkdir()
        shapes = make_shapes_fn(count, torch.Generator().manual_seed(seed))
        labels = {}
        for i in range(count):
            pixels = shapes.images[i].permute(1, 2, 0).numpy() * 255
            name = f"shape{i:02d}.png"
            Image.fromarray(np.rint(pixels).astype(np.uint8)).save(folder / name)
            labels[name] = {
                "label": classes[int(shapes.labels[i])],
                "boxes": [shapes.boxes[i].tolist()],
            }
        labels_file = root / "labels.json"
        labels_file.write_text(json.dumps(labels))
        return folder, labels_file

    return make


@pytest.fixture(scope="session")
def run_evaluate() -> RunEvaluate:
    """``run_evaluate(models_file, folder, labels, output, *options)``: ``gradcam-service
    evaluate`` in process, with that models file and labels file; its exit status."""

    def run(models_file: Path, folder: Path, labels: Path, output: Path, *extra: str) -> int:
        argv = ["evaluate", str(folder), "--models-file", str(models_file), "--labels", str(labels)]
        return main([*argv, "--output", str(output), *extra])

    return run


@pytest.fixture(scope="session")
def report_table() -> ReportTable:
    """``report_table(markdown)``: the rows of the report's ranking table, by column name."""

    def table(markdown: str) -> list[dict[str, str]]:
        lines = [line for line in markdown.splitlines() if line.startswith("| ")]
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        return [
            dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
            for line in lines[1:]
        ]

    return table
