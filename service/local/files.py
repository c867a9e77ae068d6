"""What both local commands need: the configured model, image files, and their inputs."""

from __future__ import annotations

import logging
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import torch
from tqdm import tqdm

from service.engine.cam.methods import METHOD_NAMES
from service.engine.imaging.images import DecodedImage, ImageLimits, decode_image
from service.engine.loading import load_model, resolve_device
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import Geometry, preprocess
from service.errors import ServiceError
from service.runtime.replicas import AUTOCAST_DTYPES
from service.settings import Settings

#: File name endings taken as images when a folder is given (DICOM files are read by content).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom"}
)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class CommandError(Exception):
    """A problem the user must fix (a model, a file, an option); the command prints it."""


def load_configured_model(
    settings: Settings, name: str | None, device: str | None = None
) -> LoadedModel:
    """The model ``name`` of the server's configuration (the only one when ``name`` is None),
    loaded on ``device`` (default: ``GRADCAM_DEVICE``, ``auto`` picking CUDA when present)."""
    specs = settings.model_specs()
    names = [spec.name for spec in specs]
    if name is None:
        if len(specs) > 1:
            raise CommandError(
                f"{len(specs)} models are configured ({', '.join(names)}); choose one with --model."
            )
        spec = specs[0]
    else:
        matching = [spec for spec in specs if spec.name == name]
        if not matching:
            raise CommandError(
                f"No configured model is named '{name}'; there are: {', '.join(names)}."
            )
        spec = matching[0]
    # The command says it once, below, in its own words; the loader's log line would repeat it.
    loading_logger = logging.getLogger("service.engine.loading")
    level = loading_logger.level
    loading_logger.setLevel(logging.ERROR)
    try:
        model = load_model(
            spec,
            resolve_device(device or settings.device),
            autocast_dtype=AUTOCAST_DTYPES[settings.autocast],
        )
    finally:
        loading_logger.setLevel(level)
    warning = model.weights.random_warning(model.name, "maps and scores")
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)
    return model


@dataclass(frozen=True)
class ImageFiles:
    """The image files a command works on, and how many it left out as its own output."""

    files: list[Path]
    outputs: int = 0


def image_files(
    paths: Sequence[Path], is_output: Callable[[Path], bool] | None = None
) -> ImageFiles:
    """The files named, and the image files in the folders named (recursively, sorted), each
    once (the same file by two paths is one). Files found in folders for which ``is_output``
    holds are left out and counted: a command must not read back what an earlier run of it
    wrote there (files named explicitly are always taken)."""
    found: dict[Path, Path] = {}  # the file itself -> the path it was first named by
    outputs = 0
    for path in paths:
        if path.is_dir():
            for image in sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ):
                if is_output is not None and is_output(image):
                    outputs += 1
                else:
                    found.setdefault(image.resolve(), image)
        elif path.is_file():
            found.setdefault(path.resolve(), path)
        else:
            raise CommandError(f"{path}: no such file or folder.")
    return ImageFiles(list(found.values()), outputs)


@dataclass(frozen=True)
class LocalImage:
    """An image file, decoded and preprocessed for a model."""

    path: Path
    decoded: DecodedImage
    tensor: torch.Tensor  # (C, H, W), normalised
    geometry: Geometry  # in the image's own pixel coordinates


def read_image(path: Path, model: LoadedModel, limits: ImageLimits) -> LocalImage:
    """Decode and preprocess one file, as the server would an upload of its bytes."""
    try:
        decoded = decode_image(path.read_bytes(), limits)
    except OSError as exc:
        raise CommandError(
            f"{path}: cannot read it ({exc.strerror or type(exc).__name__})."
        ) from None
    except ServiceError as exc:
        raise CommandError(f"{path}: {local_wording(exc.detail)}") from None
    tensor, geometry = preprocess(
        decoded.image, model.preprocessing, (decoded.width, decoded.height)
    )
    return LocalImage(path, decoded, tensor, geometry)


#: The engine's words for bytes sent to the API, and what they mean of a file read from disk.
_UPLOAD_WORDING = (
    (re.compile(r"^The uploaded (?:data|image) is "), ""),
    (re.compile(r"\bsend the bytes of\b"), "use"),
)


def local_wording(detail: str) -> str:
    """The engine's ``detail`` of an image said of a file read from disk rather than of an
    upload (the API keeps its own words): "The uploaded data is not an image in any
    recognised format; send the bytes of a JPEG, ... file." becomes "not an image in any
    recognised format; use a JPEG, ... file.", to follow the file's name."""
    for pattern, replacement in _UPLOAD_WORDING:
        detail = pattern.sub(replacement, detail)
    return detail


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive chunks of at most ``size`` (1 or more: 0 would crash range()
    and a negative size would yield nothing, silently skipping every image)."""
    if size < 1:
        raise ValueError(f"batch size must be 1 or more, not {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def progress(total: int, description: str, initial: int = 0) -> tqdm[NoReturn]:
    """A progress bar on stderr (drawn on a terminal only)."""
    return tqdm(total=total, initial=initial, desc=description, unit="image", disable=None)


def safe_name(text: str) -> str:
    """``text`` as a piece of a file name: letters, digits, '.', '+', '-' and '_' only ('+' is
    kept so that gradcam++ is not named as gradcam)."""
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_") or "_"


def distinct_names(choices: Mapping[K, tuple[str, str]]) -> dict[K, str]:
    """For each key its short name, or its long one where the short one is shared with another
    key's name (compared ignoring case, as a Mac's or Windows' disk does), so that no two
    outputs overwrite each other; the long names must differ from each other. A key's name
    depends only on the keys asked about together, so reruns write the same names."""
    chosen = {key: short for key, (short, _) in choices.items()}
    while True:
        holders: dict[str, list[K]] = defaultdict(list)
        for key, name in chosen.items():
            holders[name.casefold()].append(key)
        clashing = [
            key
            for keys in holders.values()
            if len(keys) > 1
            for key in keys
            if chosen[key] != choices[key][1]
        ]
        if not clashing:
            return chosen
        for key in clashing:
            chosen[key] = choices[key][1]


#: The pictures ``gradcam-service explain`` writes next to each image:
#: ``<stem>.<method>.<layer>.<class>.overlay.png`` and ``.panel.png``.
EXPLAIN_PICTURE = re.compile(
    r"^.+\.(?:"
    + "|".join(re.escape(safe_name(method)) for method in METHOD_NAMES)
    + r")\..+\..+\.(?:overlay|panel)\.png$"
)


def is_explain_picture(path: Path) -> bool:
    """Whether ``path`` is named as a picture ``gradcam-service explain`` writes: neither
    command reads those back from a folder."""
    return EXPLAIN_PICTURE.match(path.name) is not None
