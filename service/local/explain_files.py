"""``gradcam-service explain``: the original script's use, on local files, in process.

For each image and each (target, layer) it writes three files next to the image, named
``<stem>.<method>.<layer>.<label>`` plus:

- ``.overlay.png``: the heatmap coloured and blended on the image, at the image's size;
- ``.panel.png``: the four-part figure (original, overlay, heatmap, colour scale);
- ``.npy``: the map on the layer's feature grid (e.g. 7x7), rectified (ReLU or the threshold
  floor) but not normalised: the API's ``raw_heatmap``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.engine.explain import CamMap, ImageRequest, PostProcess, explain
from service.engine.images import ImageLimits
from service.engine.models import LoadedModel
from service.engine.preprocess import map_to_original
from service.engine.render import encode_png, overlay, render_panel
from service.errors import ServiceError
from service.local.files import (
    CommandError,
    LocalImage,
    batches,
    image_files,
    progress,
    read_image,
    safe_name,
)


@dataclass(frozen=True)
class ExplainOptions:
    """The command's options, as the API's explain parameters."""

    layers: tuple[str, ...] = ()  # names; none: the model's default layer
    layer_index: int | None = None
    targets: tuple[str, ...] = ()  # class indices or labels; none: the top_k predicted
    top_k: int = 1
    method: str = "gradcam"
    threshold: float | None = None
    colormap: str = "jet"
    alpha: float = 0.5
    batch_size: int = 8


def output_stem(image: Path, model: LoadedModel, cam: CamMap) -> Path:
    """Where one map's files go: next to ``image``, named after it, the method, layer and
    class (``.overlay.png``, ``.panel.png`` and ``.npy`` are added)."""
    parts = (image.stem, cam.method, cam.layer, model.labels[cam.target])
    return image.with_name(".".join(safe_name(part) for part in parts))


def explain_files(
    model: LoadedModel, paths: Sequence[Path], options: ExplainOptions, limits: ImageLimits
) -> int:
    """Explain every image of ``paths`` (files, or folders searched for images); the exit
    status: 0, or 1 when some files could not be read."""
    request, post = _plan(model, options)
    files = image_files(paths)
    if not files:
        raise CommandError("No image files found in: " + ", ".join(map(str, paths)))
    failed: list[str] = []
    written = 0
    with progress(len(files), "explain") as bar:
        for chunk in batches(files, options.batch_size):
            images: list[LocalImage] = []
            for path in chunk:
                try:
                    images.append(read_image(path, model, limits))
                except CommandError as exc:
                    failed.append(str(exc))
            if images:
                inputs = torch.stack([image.tensor for image in images])
                result = explain(
                    model, inputs, [request] * len(images), method=options.method, post=post
                )
                for image, maps in zip(images, result.maps, strict=True):
                    for cam in maps:
                        _write(model, image, cam, options, post)
                        written += 1
            bar.update(len(chunk))
    for line in failed:
        print(f"skipped {line}", file=sys.stderr)
    print(
        f"explained {len(files) - len(failed)} of {len(files)} images with {options.method}:"
        f" {written} maps, each as .overlay.png, .panel.png and .npy next to its image",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _plan(model: LoadedModel, options: ExplainOptions) -> tuple[ImageRequest, PostProcess]:
    """Resolve layers and classes before any image is read, as the API does."""
    if options.layers and options.layer_index is not None:
        raise CommandError("Give --layer or --layer-index, not both.")
    try:
        if options.layer_index is not None:
            layers: tuple[str, ...] = (model.layer(index=options.layer_index).name,)
        else:
            layers = tuple(dict.fromkeys(model.layer(name).name for name in options.layers))
        targets = tuple(dict.fromkeys(model.target(value) for value in options.targets))
        post = (
            PostProcess(mode="threshold", threshold=options.threshold)
            if options.threshold is not None
            else PostProcess()
        )
        request = ImageRequest(layers=layers, targets=targets or None, top_k=options.top_k)
    except ServiceError as exc:
        raise CommandError(exc.detail) from None
    return request, post


def _write(
    model: LoadedModel, image: LocalImage, cam: CamMap, options: ExplainOptions, post: PostProcess
) -> None:
    shown = np.asarray(image.decoded.image)
    heat = map_to_original(cam.grid_normalized, image.geometry, normalize=post.mode == "relu")
    stem = output_stem(image.path, model, cam)
    blended = overlay(shown, heat, colormap=options.colormap, alpha=options.alpha)
    stem.with_name(stem.name + ".overlay.png").write_bytes(encode_png(blended))
    title = f"{model.labels[cam.target]} ({cam.probability:.1%}) | {cam.layer} | {cam.method}"
    panel = render_panel(shown, heat, colormap=options.colormap, alpha=options.alpha, title=title)
    stem.with_name(stem.name + ".panel.png").write_bytes(encode_png(panel))
    np.save(stem.with_name(stem.name + ".npy"), cam.grid)
