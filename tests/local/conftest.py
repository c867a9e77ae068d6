"""Fixtures for the local commands: the trained shapes model as a models file, and folders of
its images written as PNG files with a labels file (classes and boxes)."""

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

from service.engine.models.spec import ModelSpec

ShapesFolder = Callable[..., tuple[Path, Path]]


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
