"""``gradcam-service evaluate``: which layer and method explain a model best, on your images.

Every image of a folder is explained with every (layer, method) asked for, for its labelled
class (else the predicted one), and each map is measured:

- where the labels file gives boxes or a mask for an image: the **pointing game** (Zhang et
  al. 2016: whether the map's peak on the image falls on the object, within
  ``pointing_tolerance`` pixels) and the **energy in box** (Score-CAM's energy-based pointing
  game: the share of the map's sum on the image that lies on the object);
- the faithfulness scores asked for (:mod:`service.engine.faithfulness.scores`);
- the time per image of the explanation and of the scores.

The (layer, method) pairs are ranked by their mean over the images, and the report is written
as Markdown and as a self-contained HTML page with thumbnails (:mod:`service.local.report`).

Results are appended to ``results.jsonl`` in the output folder after each batch of images, so
a run stopped by Ctrl-C writes its report from what it has, and the same command run again
carries on where it stopped (``--fresh`` starts over): an image is done once every (layer,
method) has its record, images that could not be read are tried again, and an unfinished last
line (the process killed, the disk full) is dropped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.engine.cam.explain import ImageRequest, explain
from service.engine.faithfulness.scores import LOWER_IS_BETTER, ScoreOptions, score_maps
from service.engine.imaging.images import ImageLimits
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import map_to_original
from service.engine.pictures.overlays import encode_png, overlay
from service.errors import ServiceError
from service.local.files import (
    CommandError,
    LocalImage,
    batches,
    image_files,
    is_explain_picture,
    progress,
    read_image,
    safe_name,
)
from service.local.report import Report, Row, write_reports
from service.settings import validation_summary

RESULTS_FILE = "results.jsonl"
THUMBNAILS_DIR = "thumbnails"
THUMBNAIL_SIDE = 128
POINTING = "pointing_game"
ENERGY = "energy_in_box"

Box = tuple[float, float, float, float]


class Annotation(BaseModel):
    """What the labels file says about one image: its class, and where the object is."""

    model_config = ConfigDict(extra="forbid")

    label: int | str | None = Field(
        default=None, description="The class to explain, by index or label; else the predicted."
    )
    boxes: list[Box] = Field(
        default_factory=list,
        description="Boxes around the object, (left, top, right, bottom) in the image's pixels.",
    )
    mask: str | None = Field(
        default=None,
        description="An image of the object's pixels (non-zero), the image's size; relative to"
        " the labels file.",
    )


def load_annotations(path: Path) -> dict[str, Annotation]:
    """``{"<file, relative to the folder>": {"label": ..., "boxes": [[l, t, r, b]], "mask":
    "..."}}``; mask paths are made relative to the labels file's folder."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(f"{path}: cannot read it as JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise CommandError(f'{path}: expected an object {{"image.png": {{"label": ...}}, ...}}.')
    annotations: dict[str, Annotation] = {}
    for name, entry in data.items():
        try:
            annotation = Annotation.model_validate(entry)
        except ValidationError as exc:
            raise CommandError(f"{path}: {name}: {validation_summary(exc)}") from None
        if annotation.mask is not None:
            annotation.mask = str((path.parent / annotation.mask).resolve())
        annotations[Path(name).as_posix()] = annotation
    return annotations


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


@dataclass
class Record:
    """One map of one image, measured."""

    image: str
    index: int  # position of the image in the folder's sorted listing
    layer: str
    method: str
    target: int
    label: str
    probability: float
    pointing: bool | None
    energy: float | None
    scores: dict[str, float]
    explain_ms: float
    scores_ms: float


def _entry(line: bytes, first: bool) -> dict[str, Any]:
    """One line of ``results.jsonl``: the configuration (the first line), a failed image, or a
    record (checked here, so that a damaged line is told apart from a usable one); else
    ValueError."""
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    if first:
        if "config" not in entry:
            raise ValueError("no configuration")
    elif "error" in entry:
        if not (isinstance(entry.get("image"), str) and isinstance(entry["error"], str)):
            raise ValueError("not a failed image")
    else:
        try:
            Record(**entry)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    return entry


@dataclass
class _Run:
    """The state of one evaluation: what is done, and where it is written."""

    output: Path
    config: dict[str, Any]
    pairs: frozenset[tuple[str, str]]  # every (layer, method) an image needs to be done
    records: list[Record] = field(default_factory=list)  # of done images only
    failed: dict[str, str] = field(default_factory=dict)  # image -> why it was skipped

    @property
    def results(self) -> Path:
        return self.output / RESULTS_FILE

    def done(self) -> set[str]:
        """The images with a record for every (layer, method); failed ones are tried again."""
        return {r.image for r in self.records}

    def resume(self, fresh: bool, names: Sequence[str]) -> None:
        """Load the results of an earlier run of the same configuration for the images
        ``names``. Only images with every (layer, method) recorded count as done: Ctrl-C can
        stop a batch's lines half written, and the records of such an image are left out
        (it is done again) rather than counted twice. An unfinished last line (the process
        killed, the disk full) is dropped from the file, so that the next lines start on
        their own; damage anywhere else stops the command."""
        lines = self._read_lines() if not fresh and self.results.exists() else []
        if not lines:
            self.output.mkdir(parents=True, exist_ok=True)
            self.results.write_text(json.dumps({"config": self.config}) + "\n")
            return
        if lines[0].get("config") != self.config:
            raise CommandError(
                f"{self.results} holds the results of another configuration (model, folder,"
                " layers, methods, scores or labels); use --fresh to start over, or another"
                " --output folder."
            )
        by_image: dict[str, dict[tuple[str, str], Record]] = {}
        failed: dict[str, str] = {}
        for entry in lines[1:]:  # the latest result of an image wins
            if "error" in entry:
                failed[entry["image"]] = entry["error"]
                by_image.pop(entry["image"], None)
            else:
                record = Record(**entry)
                failed.pop(record.image, None)
                by_image.setdefault(record.image, {})[(record.layer, record.method)] = record
        for name in names:
            mine = by_image.get(name, {})
            if self.pairs <= mine.keys():
                self.records += [mine[pair] for pair in sorted(self.pairs)]
            elif name in failed:
                self.failed[name] = failed[name]

    def _read_lines(self) -> list[dict[str, Any]]:
        """The entries of ``results.jsonl``, less an unusable last line, dropped from the
        file too (said on stderr); a CommandError for an unusable line elsewhere."""
        data = self.results.read_bytes()
        lines = data.splitlines(keepends=True)
        entries: list[dict[str, Any]] = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(_entry(line, first=number == 1))
            except ValueError as exc:
                if number < len(lines):
                    raise CommandError(
                        f"{self.results}, line {number}: damaged ({exc}); use --fresh to start"
                        " over."
                    ) from None
                kept = len(data) - len(line)
                with self.results.open("r+b") as out:
                    out.truncate(kept)
                print(
                    f"warning: {self.results}: dropped its unfinished last line (line {number},"
                    f" {exc}); what it held is evaluated again",
                    file=sys.stderr,
                )
        if lines and not data.endswith(b"\n") and len(entries) == len(lines):
            with self.results.open("ab") as out:  # a whole last line but for its end
                out.write(b"\n")
        return entries

    def append(self, records: list[Record], failed: dict[str, str]) -> None:
        """Add a batch's results, on disk first, in one write: a batch stopped half way
        leaves its images without every record, and they are done again on resume."""
        lines = [json.dumps({"image": image, "error": why}) + "\n" for image, why in failed.items()]
        lines += [json.dumps(asdict(record)) + "\n" for record in records]
        with self.results.open("a", encoding="utf-8") as out:
            out.write("".join(lines))
            out.flush()
        self.records.extend(records)
        self.failed.update(failed)
        for record in records:
            self.failed.pop(record.image, None)


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
    run = _Run(output, _config(model, folder, options, annotations), pairs)
    run.resume(fresh, names)
    done = run.done()
    todo = [i for i, name in enumerate(names) if name not in done]
    interrupted = False
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
                )
                run.append(records, failed)
                bar.update(len(chunk))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing the report from the images done so far", file=sys.stderr)
    report = _report(model, folder, files, options, columns, run, interrupted, command)
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


def measured_columns(annotations: dict[str, Annotation], scores: ScoreOptions | None) -> list[str]:
    """The report's measures, known before any image is read (so that ``--rank-by`` is
    checked up front): the pointing game and energy in box where some image has boxes or a
    mask, then the scores asked for."""
    located = any(a.boxes or a.mask is not None for a in annotations.values())
    return ([POINTING, ENERGY] if located else []) + list(scores.names if scores else ())


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
) -> tuple[list[Record], dict[str, str]]:
    """Every (layer, method) of a batch of images; images that cannot be used are skipped."""
    failed: dict[str, str] = {}
    images: list[tuple[int, str, LocalImage, int | None, np.ndarray | None]] = []
    for index, path, name in chunk:
        try:
            image = read_image(path, model, limits)
            annotation = annotations.get(name, Annotation())
            target = model.target(annotation.label) if annotation.label is not None else None
            region = _region(annotation, image)
        except (CommandError, ServiceError) as exc:
            failed[name] = exc.detail if isinstance(exc, ServiceError) else str(exc)
            continue
        images.append((index, name, image, target, region))
    if not images:
        return [], failed
    inputs = torch.stack([image.tensor for _, _, image, _, _ in images])
    records: list[Record] = []
    for method in options.methods:
        for layer in options.layers:
            requests = [
                ImageRequest(layers=(layer,), targets=None if t is None else (t,))
                for _, _, _, t, _ in images
            ]
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
            for (index, name, image, _, region), maps in zip(images, result.maps, strict=True):
                cam = maps[0]
                heat = map_to_original(cam.grid_normalized, image.geometry)
                if index < options.thumbnails:
                    thumbnails.mkdir(parents=True, exist_ok=True)
                    path = thumbnails / thumbnail_name(layer, method, index)
                    path.write_bytes(_thumbnail(image, heat))
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
                    )
                )
    return records, failed


def thumbnail_name(layer: str, method: str, index: int) -> str:
    """The file of the ``index``-th image's map by (``layer``, ``method``)."""
    return f"{safe_name(layer)}__{safe_name(method)}__{index:05d}.png"


def _thumbnail(image: LocalImage, heat: np.ndarray) -> bytes:
    """The overlay, at most THUMBNAIL_SIDE pixels on a side, as PNG."""
    picture = overlay(np.asarray(image.decoded.image), heat)
    small = Image.fromarray(picture)
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return encode_png(np.asarray(small))


def _region(annotation: Annotation, image: LocalImage) -> np.ndarray | None:
    """The object's pixels on the image (H, W): those whose centres lie in a box, or in the
    mask; None without boxes or mask."""
    if not annotation.boxes and annotation.mask is None:
        return None
    width, height = image.decoded.width, image.decoded.height
    region = np.zeros((height, width), dtype=bool)
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    for left, top, right, bottom in annotation.boxes:
        region |= ((ys >= top) & (ys <= bottom))[:, None] & ((xs >= left) & (xs <= right))[None]
    if annotation.mask is not None:
        try:
            with Image.open(annotation.mask) as mask:
                pixels = np.asarray(mask.convert("L"))
        except OSError as exc:
            raise CommandError(f"mask {annotation.mask}: cannot read it ({exc}).") from None
        if pixels.shape != region.shape:
            raise CommandError(
                f"mask {annotation.mask} is {pixels.shape[1]}x{pixels.shape[0]} pixels, the"
                f" image {width}x{height}."
            )
        region |= pixels > 0
    return region


def pointing_hit(heat: np.ndarray, region: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the map's peak (its first maximum, in raster order) lies on ``region``, or
    within ``tolerance`` pixels of it (in rows and columns).

    A map with nothing positive (Grad-CAM found no evidence for the class) has no peak: it is
    a miss, not a hit wherever an object covers pixel (0, 0), where argmax would point."""
    if not heat.size or float(heat.max()) <= 0:
        return False
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    reach = math.floor(tolerance)
    window = region[
        max(0, row - reach) : row + reach + 1,
        max(0, col - reach) : col + reach + 1,
    ]
    return bool(window.any())


def energy_inside(heat: np.ndarray, region: np.ndarray) -> float:
    """The share of the map's sum that lies on ``region`` (0 for an empty map)."""
    total = float(heat.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    return float(heat[region].sum(dtype=np.float64)) / total


def _report(
    model: LoadedModel,
    folder: Path,
    files: Sequence[Path],
    options: EvaluateOptions,
    columns: list[str],
    run: _Run,
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
                        (
                            r.image,
                            run.output / THUMBNAILS_DIR / thumbnail_name(layer, method, r.index),
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
