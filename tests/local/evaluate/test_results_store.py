"""``results.jsonl`` across runs of ``gradcam-service evaluate``: a torn last line dropped, an
image done only once every (layer, method) is recorded, damage elsewhere refused, failed images
tried again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.local.evaluate import runner

ShapesFolder = Callable[..., tuple[Path, Path]]
RunEvaluate = Callable[..., int]
ReportTable = Callable[[str], list[dict[str, str]]]


def _counting_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The images of each batch evaluated from now on."""
    real = runner._evaluate_batch
    batches: list[list[str]] = []

    def counted(model: Any, chunk: Any, *args: Any) -> Any:
        batches.append([name for _, _, name in chunk])
        return real(model, chunk, *args)

    monkeypatch.setattr(runner, "_evaluate_batch", counted)
    return batches


TWO_PAIRS = ("--layer", "layer2", "--layer", "layer3", "--scores", "none", "--batch-size", "3")


def test_a_torn_last_line_is_dropped_and_what_it_held_evaluated_again(
    run_evaluate: RunEvaluate,
    report_table: ReportTable,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(3, 19)
    output = tmp_path / "report"
    assert run_evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    results = output / "results.jsonl"
    data = results.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    assert json.loads(last)["image"] == "shape02.png"  # layer3's record of the last image
    results.write_bytes(data[: len(data) - len(last) // 2])  # killed half way through it
    capsys.readouterr()
    batches = _counting_batches(monkeypatch)
    assert run_evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    assert "dropped its unfinished last line" in capsys.readouterr().err
    assert batches == [["shape02.png"]]
    rows = report_table((output / "report.md").read_text())
    assert [row["images"] for row in rows] == ["3", "3"]  # shape02's layer2 record not twice
    for line in results.read_text().splitlines():
        json.loads(line)  # the next lines started on their own


def test_an_image_is_done_only_when_every_layer_and_method_is_recorded(
    run_evaluate: RunEvaluate,
    report_table: ReportTable,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, labels = shapes_folder(3, 21)
    output = tmp_path / "report"
    assert run_evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    results = output / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    # Ctrl-C while the batch was written: layer3's records of the last two images are missing.
    results.write_text("".join(lines[:-2]))
    batches = _counting_batches(monkeypatch)
    assert run_evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    assert batches == [["shape01.png", "shape02.png"]]
    report = (output / "report.md").read_text()
    assert "3 of 3 images evaluated" in report
    assert [row["images"] for row in report_table(report)] == ["3", "3"]
    # Their earlier layer2 records are still in the file: they must not count a third time.
    batches.clear()
    assert run_evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    assert batches == []
    assert [row["images"] for row in report_table((output / "report.md").read_text())] == ["3", "3"]


def test_damage_before_the_last_line_is_one_line_suggesting_fresh(
    run_evaluate: RunEvaluate,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(2, 25)
    output = tmp_path / "report"
    options = ("--layer", "layer2", "--scores", "none")
    assert run_evaluate(shapes_models_file, folder, labels, output, *options) == 0
    results = output / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text(lines[0] + '{"image": "shape00.p\n' + "".join(lines[2:]))
    capsys.readouterr()
    assert run_evaluate(shapes_models_file, folder, labels, output, *options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "line 2" in err
    assert "--fresh" in err
    assert run_evaluate(shapes_models_file, folder, labels, output, *options, "--fresh") == 0


def test_images_that_failed_are_tried_again_on_the_next_run(
    run_evaluate: RunEvaluate,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, labels = shapes_folder(2, 27)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    output = tmp_path / "report"
    options = ("--layer", "layer2", "--scores", "none")
    assert run_evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert "2 of 3 images evaluated" in (output / "report.md").read_text()
    broken.write_bytes((folder / "shape00.png").read_bytes())  # the user fixed the file
    batches = _counting_batches(monkeypatch)
    assert run_evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert batches == [["broken.png"]]
    report = (output / "report.md").read_text()
    assert "3 of 3 images evaluated" in report
    assert "skipped" not in report
