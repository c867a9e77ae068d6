"""``gradcam-service evaluate`` end to end, in process, on PNG files of the trained shapes model.

The localisation test (tests/engine/cam/test_localisation.py) knows that Grad-CAM at ``layer2``
points at the shape (its peak within half a cell, 4 px, of the box for 9 images in 10 or more)
and that ``layer1`` and ``layer3`` do not; the command must rank ``layer2`` first from the files
and their labels alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.cli import main
from service.engine.cam.explain import explain
from service.local.evaluate import runner

ShapesFolder = Callable[..., tuple[Path, Path]]
RunEvaluate = Callable[..., int]
ReportTable = Callable[[str], list[dict[str, str]]]
HELD_OUT_SEED = 99_991


def test_evaluate_ranks_first_the_layer_that_points_at_the_shapes(
    run_evaluate: RunEvaluate,
    report_table: ReportTable,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
) -> None:
    folder, labels = shapes_folder(40, HELD_OUT_SEED)
    output = tmp_path / "report"
    layers = [arg for layer in ("layer1", "layer2", "layer3") for arg in ("--layer", layer)]
    status = run_evaluate(
        shapes_models_file,
        folder,
        labels,
        output,
        *layers,
        "--scores",
        "confidence_change",
        "--pointing-tolerance",
        "4",
    )
    assert status == 0
    rows = report_table((output / "report.md").read_text())
    assert rows[0]["layer"] == "layer2"
    assert {row["layer"] for row in rows} == {"layer1", "layer2", "layer3"}
    best, *others = (float(row["pointing_game"]) for row in rows)
    assert best >= 0.9
    assert all(other <= best - 0.3 for other in others)  # a real difference, not a tie
    for row in rows:
        assert row["images"] == "40"
        assert -1.0 <= float(row["confidence_change"]) <= 1.0
        assert 0.0 <= float(row["energy_in_box"]) <= 1.0
        assert float(row["explain ms/image"]) > 0
    page = (output / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 * 6  # 6 thumbnails a pair
    assert page.count("<figcaption>shape00.png<br>") == 3  # each named, with its result
    best_maps = page.split("<h3>1. <code>layer2</code>")[1].split("</section>")[0]
    assert best_maps.count("pointing game: hit") >= 5
    with Image.open(output / "thumbnails" / "layer2__gradcam__00000.png") as picture:
        assert picture.size == (256, 256)  # the 64 px image scaled up to be read
    assert "<code>gradcam-service evaluate " in page  # the command to run it again
    for external in ('src="http', "<link", "<script", "url("):  # self-contained
        assert external not in page
    records = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 + 40 * 3  # the configuration, then one line per map


def test_ctrl_c_writes_the_report_so_far_and_the_same_command_carries_on(
    run_evaluate: RunEvaluate,
    report_table: ReportTable,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(6, 7)
    output = tmp_path / "report"
    real = runner._evaluate_batch
    batches: list[int] = []

    def interrupted_at_the_second_batch(model: Any, chunk: Any, *args: Any) -> Any:
        batches.append(len(chunk))
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real(model, chunk, *args)

    options = ("--layer", "layer2", "--scores", "none", "--batch-size", "2")
    monkeypatch.setattr(runner, "_evaluate_batch", interrupted_at_the_second_batch)
    assert run_evaluate(shapes_models_file, folder, labels, output, *options) == 130
    report = (output / "report.md").read_text()
    assert "INTERRUPTED" in report
    assert "2 of 6 images evaluated" in report
    assert len(report_table(report)) == 1

    batches.clear()

    def counted(model: Any, chunk: Any, *args: Any) -> Any:
        batches.append(len(chunk))
        return real(model, chunk, *args)

    monkeypatch.setattr(runner, "_evaluate_batch", counted)
    assert run_evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert batches == [2, 2]  # the 4 images left: the first 2 were not done again
    report = (output / "report.md").read_text()
    assert "INTERRUPTED" not in report
    assert "6 of 6 images evaluated" in report
    assert report_table(report)[0]["images"] == "6"

    capsys.readouterr()
    other = ("--layer", "layer3", "--scores", "none")
    assert run_evaluate(shapes_models_file, folder, labels, output, *other) == 2
    assert "--fresh" in capsys.readouterr().err
    assert run_evaluate(shapes_models_file, folder, labels, output, *other, "--fresh") == 0


def test_unusable_images_and_labels_are_reported_not_fatal(
    run_evaluate: RunEvaluate,
    report_table: ReportTable,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
) -> None:
    folder, labels = shapes_folder(3, 11)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    entries = json.loads(labels.read_text())
    entries["shape01.png"]["label"] = "triangle"
    labels.write_text(json.dumps(entries))
    output = tmp_path / "report"
    status = run_evaluate(shapes_models_file, folder, labels, output, "--layer", "layer2")
    assert status == 0
    report = (output / "report.md").read_text()
    assert "2 of 4 images evaluated" in report
    assert "broken.png" in report
    assert "triangle" in report
    assert report_table(report)[0]["images"] == "2"


@pytest.mark.parametrize("inside", ["report", "."], ids=["output-in-folder", "output-is-folder"])
def test_a_second_run_does_not_evaluate_the_thumbnails_of_the_first(
    run_evaluate: RunEvaluate,
    report_table: ReportTable,
    inside: str,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(3, 17)
    output = folder / inside
    options = ("--layer", "layer2", "--scores", "none")
    assert run_evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert len(list((output / "thumbnails").glob("*.png"))) == 3
    capsys.readouterr()
    for again in ((), ("--fresh",)):
        assert run_evaluate(shapes_models_file, folder, labels, output, *options, *again) == 0
        assert "left out 3 images of this command's output" in capsys.readouterr().err
        report = (output / "report.md").read_text()
        assert "3 of 3 images evaluated" in report
        assert report_table(report)[0]["images"] == "3"


def test_pictures_written_by_explain_in_the_folder_are_not_evaluated(
    run_evaluate: RunEvaluate,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(3, 19)
    explain = ["explain", str(folder), "--models-file", str(shapes_models_file)]
    assert main([*explain, "--layer", "layer2"]) == 0
    assert len(list(folder.glob("*.png"))) == 3 + 3 * 2  # an overlay and a panel each
    capsys.readouterr()
    options = ("--layer", "layer2", "--scores", "none")
    assert run_evaluate(shapes_models_file, folder, labels, tmp_path / "report", *options) == 0
    assert "left out 6 pictures written by gradcam-service explain" in capsys.readouterr().err
    assert "3 of 3 images evaluated" in (tmp_path / "report" / "report.md").read_text()


def test_the_times_leave_out_a_warm_up_call_of_each_layer_and_method(
    run_evaluate: RunEvaluate,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first call's one-time costs (here a 1 s sleep, once per layer and method) are paid by
    an untimed warm-up call: no time per image carries them."""
    folder, labels = shapes_folder(4, 29)
    real = explain
    calls: list[tuple[str, str]] = []

    def slow_the_first_time(model: Any, inputs: Any, requests: Any, method: str) -> Any:
        pair = (requests[0].layers[0], method)
        if pair not in calls:
            time.sleep(1.0)
        calls.append(pair)
        return real(model, inputs, requests, method=method)

    monkeypatch.setattr(runner, "explain", slow_the_first_time)
    output = tmp_path / "report"
    options = ("--layer", "layer2", "--layer", "layer3", "--method", "gradcam")
    extra = ("--method", "layercam", "--scores", "none", "--batch-size", "2")
    assert run_evaluate(shapes_models_file, folder, labels, output, *options, *extra) == 0
    pairs = {
        (layer, method) for layer in ("layer2", "layer3") for method in ("gradcam", "layercam")
    }
    assert sorted(calls) == sorted([*pairs, *pairs, *pairs])  # a warm-up, then 2 batches
    lines = (output / "results.jsonl").read_text().splitlines()[1:]
    times = [json.loads(line)["explain_ms"] for line in lines]
    assert len(times) == 4 * 4
    assert all(0 < ms < 500 for ms in times), times  # 1 s over a batch of 2 would be 500+
    assert "after one untimed warm-up call" in (output / "report.md").read_text()
