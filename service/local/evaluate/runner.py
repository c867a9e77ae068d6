"""The batch loop of ``gradcam-service evaluate``: the folder's images, explained and measured a
batch at a time, each batch's results appended to ``results.jsonl`` before the next; Ctrl-C
stops it and the report is written from the images done (exit status 130)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.engine.cam.explain import ImageRequest, explain
from service.engine.faithfulness.scores import score_maps
from service.engine.imaging.images import ImageLimits
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import map_to_original
from service.errors import ServiceError
from service.local.evaluate.annotations import Annotation, object_region
from service.local.evaluate.localisation import energy_inside, pointing_hit
from service.local.evaluate.options import EvaluateOptions
from service.local.evaluate.ranking import measured_columns, ranked_report
from service.local.evaluate.report import write_reports
from service.local.evaluate.store import Record, Run
from service.local.evaluate.thumbnails import (
    THUMBNAILS_DIR,
    crops_away,
    thumbnail,
    thumbnail_name,
)
from service.local.files import (
    CommandError,
    LocalImage,
    batches,
    image_files,
    is_explain_picture,
    progress,
    read_image,
)


def evaluate(
    model: LoadedModel,
    folder: Path,
    output: Path,
    options: EvaluateOptions,
    *,
    annotations: dict[str, Annotation] | None = None,
    limits: ImageLimits | None = None,
    fresh: bool = False,
    command: str = "",
) -> int:
    """Evaluate, write the report; the exit status: 0, or 130 when interrupted (Ctrl-C)."""
    annotations = annotations or {}
    columns = measured_columns(annotations, options.scores)
    if options.rank_by is not None and options.rank_by not in columns:
        choices = f"choose one of {', '.join(columns)}" if columns else "it measures nothing"
        raise CommandError(
            f"--rank-by {options.rank_by}: this run does not measure it ({choices}; the"
            " pointing game and energy in box need boxes or masks in the labels)."
        )
    own_output = _inside(output, folder)
    left_out = {"output": 0, "explain": 0}

    def not_an_image_to_evaluate(path: Path) -> bool:
        kind = "output" if own_output(path) else "explain" if is_explain_picture(path) else None
        if kind is not None:
            left_out[kind] += 1
        return kind is not None

    found = image_files([folder], not_an_image_to_evaluate)
    files = found.files
    if not files:
        raise CommandError(f"{folder}: no image files found.")
    names = [path.relative_to(folder).as_posix() for path in files]
    unknown = sorted(set(annotations) - set(names))
    if unknown:
        raise CommandError(
            f"The labels file names images that are not in {folder}: {', '.join(unknown[:5])}."
        )
    pairs = frozenset((layer, method) for layer in options.layers for method in options.methods)
    run = Run(output, _config(model, folder, options, annotations), pairs)
    run.resume(fresh, names)
    done = run.done()
    todo = [i for i, name in enumerate(names) if name not in done]
    interrupted = False
    warmed: set[tuple[str, str]] = set()  # the (layer, method) pairs run once untimed
    try:
        with progress(len(files), "evaluate", initial=len(files) - len(todo)) as bar:
            for chunk in batches(todo, options.batch_size):
                records, failed = _evaluate_batch(
                    model,
                    [(i, files[i], names[i]) for i in chunk],
                    options,
                    annotations,
                    limits or ImageLimits(),
                    output / THUMBNAILS_DIR,
                    warmed,
                )
                run.append(records, failed)
                bar.update(len(chunk))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing the report from the images done so far", file=sys.stderr)
    report = ranked_report(model, folder, files, options, columns, run, interrupted, command)
    markdown, html = write_reports(output, report)
    if left_out["output"]:
        print(
            f"left out {left_out['output']} images of this command's output in {output}",
            file=sys.stderr,
        )
    if left_out["explain"]:
        print(
            f"left out {left_out['explain']} pictures written by gradcam-service explain"
            " (.overlay.png, .panel.png)",
            file=sys.stderr,
        )
    print(f"wrote {markdown} and {html}", file=sys.stderr)
    return 130 if interrupted else 0


def _inside(output: Path, folder: Path) -> Callable[[Path], bool]:
    """Whether a file found in ``folder`` is this command's output: anything under the output
    folder where that lies inside ``folder`` (else a second run would evaluate the first
    one's thumbnails), its thumbnails where it is ``folder`` itself."""
    out, root = output.resolve(), folder.resolve()
    if not out.is_relative_to(root):
        return lambda path: False
    mine = out.relative_to(root).parts or (THUMBNAILS_DIR,)

    def inside(path: Path) -> bool:
        return path.relative_to(folder).parts[: len(mine)] == mine

    return inside


def _config(
    model: LoadedModel,
    folder: Path,
    options: EvaluateOptions,
    annotations: dict[str, Annotation],
) -> dict[str, Any]:
    """What results depend on: a run resumes only the results of an equal configuration."""
    scores = asdict(options.scores) if options.scores is not None else None
    config: dict[str, Any] = json.loads(
        json.dumps(
            {
                "model": model.name,
                "architecture": model.spec.architecture,
                "weights": model.weights.location or model.weights.source,
                "folder": str(folder.resolve()),
                "layers": list(options.layers),
                "methods": list(options.methods),
                "scores": scores,
                "pointing_tolerance": options.pointing_tolerance,
                "labels": {k: v.model_dump() for k, v in sorted(annotations.items())},
            }
        )
    )
    return config


def _evaluate_batch(
    model: LoadedModel,
    chunk: Sequence[tuple[int, Path, str]],
    options: EvaluateOptions,
    annotations: dict[str, Annotation],
    limits: ImageLimits,
    thumbnails: Path,
    warmed: set[tuple[str, str]],
) -> tuple[list[Record], dict[str, str]]:
    """Every (layer, method) of a batch of images; images that cannot be used are skipped.

    The first time a (layer, method) runs (it is not in ``warmed``, and is added), it runs
    once more, untimed, before the timed call: a first call pays one-time costs (kernels
    loaded and tuned, memory allocated, lazy set-up; 58.8 to 1384 ms a map for the same work
    were seen) that would make its batch's times stand for something else than the method's.
    The scores are warmed up likewise, once, on one image."""
    failed: dict[str, str] = {}
    images: list[tuple[int, str, LocalImage, Annotation, int | None, np.ndarray | None]] = []
    for index, path, name in chunk:
        try:
            image = read_image(path, model, limits)
            annotation = annotations.get(name, Annotation())
            target = model.target(annotation.label) if annotation.label is not None else None
            region = object_region(annotation, image)
        except (CommandError, ServiceError) as exc:
            failed[name] = exc.detail if isinstance(exc, ServiceError) else str(exc)
            continue
        images.append((index, name, image, annotation, target, region))
    if not images:
        return [], failed
    inputs = torch.stack([image.tensor for _, _, image, _, _, _ in images])
    records: list[Record] = []
    for method in options.methods:
        for layer in options.layers:
            requests = [
                ImageRequest(layers=(layer,), targets=None if t is None else (t,))
                for _, _, _, _, t, _ in images
            ]
            if (layer, method) not in warmed:
                _warm_up(model, inputs, requests, method, options, first=not warmed)
                warmed.add((layer, method))
            started = time.perf_counter()
            result = explain(model, inputs, requests, method=method)
            explained = time.perf_counter()
            if options.scores is not None:
                score_maps(
                    model, inputs, result.maps, options.scores, batch_size=options.score_batch_size
                )
            scored = time.perf_counter()
            explain_ms = 1000 * (explained - started) / len(images)
            scores_ms = 1000 * (scored - explained) / len(images)
            for (index, name, image, annotation, target, region), maps in zip(
                images, result.maps, strict=True
            ):
                cam = maps[0]
                heat = map_to_original(cam.grid_normalized, image.geometry)
                if index < options.thumbnails:
                    thumbnails.mkdir(parents=True, exist_ok=True)
                    path = thumbnails / thumbnail_name(layer, method, index)
                    label = None if target is None else model.labels[target]
                    outline = region if annotation.mask is not None else None
                    path.write_bytes(thumbnail(image, heat, annotation.boxes, label, outline))
                records.append(
                    Record(
                        image=name,
                        index=index,
                        layer=layer,
                        method=method,
                        target=cam.target,
                        label=model.labels[cam.target],
                        probability=cam.probability,
                        pointing=None
                        if region is None
                        else pointing_hit(heat, region, options.pointing_tolerance),
                        energy=None if region is None else energy_inside(heat, region),
                        scores=dict(cam.scores),
                        explain_ms=explain_ms,
                        scores_ms=scores_ms,
                        cropped=crops_away(image),
                    )
                )
    return records, failed


def _warm_up(
    model: LoadedModel,
    inputs: torch.Tensor,
    requests: Sequence[ImageRequest],
    method: str,
    options: EvaluateOptions,
    first: bool,
) -> None:
    """One untimed explain of ``inputs`` (the batch about to be timed: the same shapes), and,
    where ``first`` and scores are asked for, one untimed scoring of the first image's map."""
    result = explain(model, inputs, requests, method=method)
    if first and options.scores is not None:
        score_maps(
            model,
            inputs[:1],
            result.maps[:1],
            options.scores,
            batch_size=options.score_batch_size,
        )
