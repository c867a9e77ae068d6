"""Fixtures shared by the whole suite: seeded randomness, cached tiny models, a trained model.

Helpers are handed out as fixtures rather than imported: several ``conftest.py`` files exist and
they all share the module name ``conftest``.

- ``rng``: a seeded NumPy generator, for test data.
- ``load_tiny(arch, **kwargs)``: a :class:`LoadedModel` with random (but seeded, so the same in
  every run and every test order) weights on the CPU, cached for the session per
  ``(arch, kwargs)``. Cached models are shared: tests must not modify them.
- ``shapes_model``: a small ResNet trained in the session (about 12 s on 2 idle cores) to tell a
  square, a cross and a disk apart on noisy 64x64 images, saved as a state dict and loaded
  through the engine; ``make_shapes`` generates its images with their bounding boxes.
- ``make_dicom(pixels, photometric, bits_stored, ...)``: the bytes of a DICOM file written with
  pydicom (uncompressed or compressed with ``Dataset.compress``), carrying the identifying
  attributes of ``PATIENT`` (handed out as the ``patient`` fixture) so that tests can look for
  them where they must never appear.
- ``@pytest.mark.gpu`` tests are skipped where CUDA is not available.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from service.engine import loading
from service.engine.loading import load_model
from service.engine.models.loaded import LoadedModel
from service.engine.models.spec import ModelSpec, PreprocessOverrides

SEED = 20240607
TORCH_THREADS = 2

torch.set_num_threads(TORCH_THREADS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    """Keep intra-op parallelism at the machine's 2 cores, whatever an earlier test did."""
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def rng() -> np.random.Generator:
    """A seeded generator for test data (session-wide: draw, do not re-seed)."""
    return np.random.default_rng(SEED)


TinyLoader = Callable[..., LoadedModel]


def _freeze(value: Any) -> Any:
    """A hashable, order-independent stand-in for keyword arguments (dicts, lists, tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@pytest.fixture(scope="session")
def load_tiny() -> TinyLoader:
    """``load_tiny(arch, *, num_classes=None, labels=None, preprocessing=None, **model_kwargs)``.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``depth=2``, ``img_size=(160, 96)``);
    ``preprocessing`` is a dict of :class:`PreprocessOverrides` fields. Weights are random,
    initialised under a fixed seed, so a model is the same whichever test loads it first.
    """
    cache: dict[Any, LoadedModel] = {}

    def load(
        arch: str,
        *,
        num_classes: int | None = None,
        labels: list[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> LoadedModel:
        key = _freeze((arch, num_classes, labels, preprocessing, model_kwargs))
        if key not in cache:
            spec = ModelSpec(
                name=arch.replace("_", "-")[:64],
                architecture=arch,
                num_classes=num_classes,
                weights="random",
                labels=labels,
                preprocessing=PreprocessOverrides(**(preprocessing or {})),
                model_kwargs=model_kwargs,
            )
            # One seed for every tiny model, not the engine's seed from the name: the tests'
            # expectations (a non-empty map on a random network, ...) were drawn under it.
            with mock.patch.object(loading, "random_seed", return_value=SEED):
                cache[key] = load_model(spec, torch.device("cpu"))
        return cache[key]

    return load


# ---------------------------------------------------------------------------------------------
# A model trained in the session: shapes on noise.

SHAPE_CLASSES = ("square", "cross", "disk")
SHAPES_SIZE = 64
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.25, 0.25, 0.25)
# A ResNet-18 layout with narrow stages: trains in seconds, still has four stages
# (64x64 input: layer1 16x16, layer2 8x8, layer3 4x4, layer4 2x2).
SHAPES_KWARGS: dict[str, Any] = {"channels": (16, 32, 64, 128), "stem_width": 16}


@dataclass(frozen=True)
class Shapes:
    """A batch of synthetic images: ``images`` (N, 3, 64, 64) in [0, 1], normalised with
    ``normalise``; ``labels`` (N,); ``boxes`` (N, 4) as (left, top, right, bottom) in pixels."""

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    def normalised(self) -> torch.Tensor:
        mean = torch.tensor(SHAPES_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SHAPES_STD).view(1, 3, 1, 1)
        return (self.images - mean) / std


def make_shapes(count: int, generator: torch.Generator) -> Shapes:
    """One bright shape (square, cross or disk, 14-20 px, random colour) per image, at a random
    place on a uniform-noise background. The class is the shape."""
    size = SHAPES_SIZE
    labels = torch.randint(0, len(SHAPE_CLASSES), (count,), generator=generator)
    half = torch.randint(14, 21, (count,), generator=generator).float() / 2
    span = size - 2 * half - 4
    cx = torch.rand(count, generator=generator) * span + half + 2
    cy = torch.rand(count, generator=generator) * span + half + 2
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = (coords.view(1, size, 1) - cy.view(-1, 1, 1)).abs()
    dx = (coords.view(1, 1, size) - cx.view(-1, 1, 1)).abs()
    h = half.view(-1, 1, 1)
    square = (dx <= h) & (dy <= h)
    bar = h / 3
    cross = ((dx <= h) & (dy <= bar)) | ((dy <= h) & (dx <= bar))
    disk = dx**2 + dy**2 <= h**2
    kind = labels.view(-1, 1, 1)
    mask = torch.where(kind == 0, square, torch.where(kind == 1, cross, disk)).float()[:, None]
    background = torch.rand(count, 3, size, size, generator=generator) * 0.6
    colour = 0.6 + 0.4 * torch.rand(count, 3, 1, 1, generator=generator)
    images = background * (1 - mask) + colour * mask
    boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)
    return Shapes(images=images, labels=labels, boxes=boxes)


def shapes_spec(weights: Path) -> ModelSpec:
    return ModelSpec(
        name="shapes",
        architecture="resnet18",
        num_classes=len(SHAPE_CLASSES),
        weights=str(weights),
        labels=list(SHAPE_CLASSES),
        preprocessing=PreprocessOverrides(
            input_size=(SHAPES_SIZE, SHAPES_SIZE),
            crop_pct=1.0,
            mean=SHAPES_MEAN,
            std=SHAPES_STD,
        ),
        model_kwargs=SHAPES_KWARGS,
    )


def train_shapes_model(path: Path, seed: int = SEED, steps: int = 150) -> Path:
    """Train the shapes classifier (fresh data every step) and save its state dict to ``path``."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = timm.create_model("resnet18", num_classes=len(SHAPE_CLASSES), **SHAPES_KWARGS)
        optimiser = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=5e-3, total_steps=steps, pct_start=0.2
        )
        model.train()
        for _ in range(steps):
            batch = make_shapes(64, generator)
            loss = torch.nn.functional.cross_entropy(model(batch.normalised()), batch.labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        # Re-estimate the batch-norm statistics as exact averages over fresh batches, so eval
        # mode sees the trained weights' statistics rather than a lagging running mean.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        with torch.no_grad():
            for _ in range(8):
                model(make_shapes(64, generator).normalised())
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def make_shapes_fn() -> Callable[[int, torch.Generator], Shapes]:
    """The synthetic-shapes generator used to train ``shapes_model``."""
    return make_shapes


@pytest.fixture(scope="session")
def shapes_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained shapes classifier's state dict (``.pt``), trained once per session."""
    return train_shapes_model(tmp_path_factory.mktemp("shapes") / "shapes_resnet.pt")


@pytest.fixture(scope="session")
def shapes_model_spec(shapes_weights: Path) -> ModelSpec:
    """The models-file entry of the trained shapes classifier (for commands that load it)."""
    return shapes_spec(shapes_weights)


@pytest.fixture(scope="session")
def shapes_model(shapes_weights: Path) -> LoadedModel:
    """The trained shapes classifier, loaded through the engine from its ``.pt`` file."""
    return load_model(shapes_spec(shapes_weights), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# DICOM files written by the tests.

#: Identifying attributes every test DICOM carries; none may reach a log line or an error body.
PATIENT: dict[str, str] = {
    "PatientName": "Zyxwut^Quorra^Ingrid",
    "PatientID": "PID-7Q4Z-93851",
    "PatientBirthDate": "19530417",
    "PatientSex": "F",
    "AccessionNumber": "ACC-55102-K",
    "InstitutionName": "Hospital Veridian Secret",
    "ReferringPhysicianName": "Trelawney^Cassius",
}
STUDY_UID = "1.2.826.0.1.3680043.8.498.11111111111111111111"

DicomFactory = Callable[..., bytes]


def make_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    *,
    syntax: str = ExplicitVRLittleEndian,
    sop_class: str = SecondaryCaptureImageStorage,
    preamble: bool = True,
    **attributes: Any,
) -> bytes:
    """A DICOM Part 10 file of ``pixels`` (rows x columns [x 3], or frames first for several
    frames), compressed to ``syntax`` when it is a compressed one, with ``PATIENT``'s attributes,
    a study and series, and ``attributes`` (keywords; ``None`` deletes one)."""
    import io

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if UID(syntax).is_compressed:
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        if not UID(syntax).is_little_endian:  # pydicom writes Pixel Data bytes as they are
            ds.PixelData = np.ascontiguousarray(pixels).byteswap().tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[128:]


@pytest.fixture(scope="session")
def dicom_factory() -> DicomFactory:
    """``make_dicom(pixels, photometric="MONOCHROME2", bits_stored=8, *, syntax=..., **attrs)``."""
    return make_dicom


@pytest.fixture(scope="session")
def patient() -> dict[str, str]:
    """The identifying attributes every ``make_dicom`` file carries."""
    return dict(PATIENT)
