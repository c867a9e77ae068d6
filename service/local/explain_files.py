"""``gradcam-service explain``: the original script's use, on local files, in process.

For each image and each (target, layer) it writes three files next to the image, named
``<stem>.<method>.<layer>.<label>`` plus the endings below. The stem is the image's whole name
(``im0.png``) where another image of the same folder has the same stem (``im0.jpg``); the
label is followed by the class index (``crane.134``) where another class has the same label
(ImageNet's two cranes): no map overwrites another's files.

- ``.overlay.png``: the heatmap coloured and blended on the image, at the image's size;
- ``.panel.png``: the four-part figure (original, overlay, heatmap, colour scale);
- ``.npy``: the map on the layer's feature grid (e.g. 7x7), rectified (ReLU or the threshold
  floor) but not normalised: the API's ``raw_heatmap``.

Images in folders whose names end as these pictures do (``.<method>.<layer>.<label>.overlay.png``
and ``.panel.png``) are left out: a second run must not explain the first one's pictures.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.engine.cam.explain import CamMap, PostProcess, explain
from service.engine.imaging.images import ImageLimits
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import map_to_original
from service.engine.pictures.overlays import (
    NOT_SEEN_LEGEND,
    encode_png,
    overlay,
    partly_seen,
    render_panel,
)
from service.engine.plan import ExplainParameters, class_from_text, plan_explain
from service.local.files import (
    CommandError,
    LocalImage,
    batches,
    distinct_names,
    image_files,
    is_explain_picture,
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

    def parameters(self) -> ExplainParameters:
        """What to explain, for the engine's plan (an option left out is None there)."""
        return ExplainParameters(
            layers=self.layers or None,
            layer_index=self.layer_index,
            targets=[class_from_text(target) for target in self.targets] or None,
            top_k=self.top_k,
            method=self.method,
            threshold=self.threshold,
        )


def image_stems(files: Sequence[Path]) -> dict[Path, str]:
    """The name each image's outputs start with: its stem, or its whole name where another of
    ``files`` in the same folder has the same stem (``im0.png`` and ``im0.jpg``)."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in files:
        by_folder[path.parent.resolve()].append(path)
    stems: dict[Path, str] = {}
    for paths in by_folder.values():
        stems.update(distinct_names({path: (path.stem, path.name) for path in paths}))
    return stems


def class_names(labels: Sequence[str]) -> list[str]:
    """Each class's part of a file name: its label, followed by its index where another
    class's label is written the same way (ImageNet's two ``crane`` classes, 134 and 517;
    ``a b`` and ``a/b``; ``Crane`` and ``crane`` on a disk that ignores case)."""
    names = distinct_names(
        {i: (safe_name(label), f"{safe_name(label)}.{i}") for i, label in enumerate(labels)}
    )
    return list(names.values())


def output_stem(image: Path, stem: str, classes: Sequence[str], cam: CamMap) -> Path:
    """Where one map's files go: next to ``image``, named after it (``stem``), the method,
    layer and class (``.overlay.png``, ``.panel.png`` and ``.npy`` are added)."""
    return image.with_name(
        ".".join((stem, safe_name(cam.method), safe_name(cam.layer), classes[cam.target]))
    )


def explain_files(
    model: LoadedModel, paths: Sequence[Path], options: ExplainOptions, limits: ImageLimits
) -> int:
    """Explain every image of ``paths`` (files, or folders searched for images, less the
    pictures of an earlier run); the exit status: 0, or 1 when some files could not be read
    or some maps were not written."""
    plan = plan_explain(model, options.parameters())  # before any image is read
    post = plan.post
    found = image_files(paths, is_explain_picture)
    files = found.files
    if not files:
        raise CommandError("No image files found in: " + ", ".join(map(str, paths)))
    stems = image_stems(files)
    classes = class_names(model.labels)
    failed: list[str] = []  # files that could not be read
    clashes: list[str] = []  # maps not written, lest they overwrite another's
    written: set[Path] = set()
    cropped = 0  # images part of which the model never saw
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
                requests = [plan.request] * len(images)
                result = explain(model, inputs, requests, method=plan.method, post=post)
                for image, maps in zip(images, result.maps, strict=True):
                    cropped += _partly_seen(image)
                    for cam in maps:
                        stem = output_stem(image.path, stems[image.path], classes, cam)
                        if stem in written:  # never silently: the names are meant to differ
                            clashes.append(
                                f"{image.path}: not written, {stem.name}.* was written earlier"
                                " in this run"
                            )
                            continue
                        _write(model, image, cam, options, post, stem)
                        written.add(stem)
            bar.update(len(chunk))
    for line in failed + clashes:
        print(f"skipped {line}", file=sys.stderr)
    outputs = (
        f"; left out {found.outputs} pictures of an earlier explain (.overlay.png, .panel.png)"
        if found.outputs
        else ""
    )
    print(
        f"explained {len(files) - len(failed)} of {len(files)} images with {options.method}:"
        f" {len(written)} maps, each as .overlay.png, .panel.png and .npy next to its image"
        + outputs,
        file=sys.stderr,
    )
    if cropped:
        print(
            f"the model's crop left out part of {cropped} of the images: in their pictures, "
            + NOT_SEEN_LEGEND,
            file=sys.stderr,
        )
    return 1 if failed or clashes else 0


def _partly_seen(image: LocalImage) -> bool:
    """Whether the model's input leaves part of ``image`` out (the centre crop's ends)."""
    height, width = image.geometry.original_size
    return partly_seen(image.geometry.input_box(), width, height)


def _write(
    model: LoadedModel,
    image: LocalImage,
    cam: CamMap,
    options: ExplainOptions,
    post: PostProcess,
    stem: Path,
) -> None:
    shown = np.asarray(image.decoded.image)
    heat = map_to_original(cam.grid_normalized, image.geometry, normalize=post.renormalizes)
    seen = image.geometry.input_box()
    blended = overlay(shown, heat, colormap=options.colormap, alpha=options.alpha, seen=seen)
    stem.with_name(stem.name + ".overlay.png").write_bytes(encode_png(blended))
    title = f"{model.labels[cam.target]} ({cam.probability:.1%}) | {cam.layer} | {cam.method}"
    panel = render_panel(
        shown, heat, colormap=options.colormap, alpha=options.alpha, title=title, seen=seen
    )
    stem.with_name(stem.name + ".panel.png").write_bytes(encode_png(panel))
    np.save(stem.with_name(stem.name + ".npy"), cam.grid)
