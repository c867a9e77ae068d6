"""``gradcam-service evaluate`` end to end, in process, on PNG files of the trained shapes model.

The localisation test (tests/engine/cam/test_localisation.py) knows that Grad-CAM at ``layer2``
points at the shape (its peak within half a cell, 4 px, of the box for 9 images in 10 or more)
and that ``layer1`` and ``layer3`` do not; the command must rank ``layer2`` first from the files
and their labels alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.local import evaluate as evaluate_module

ShapesFolder = Callable[..., tuple[Path, Path]]
HELD_OUT_SEED = 99_991


def _evaluate(models_file: Path, folder: Path, labels: Path, output: Path, *extra: str) -> int:
    argv = ["evaluate", str(folder), "--models-file", str(models_file), "--labels", str(labels)]
    return main([*argv, "--output", str(output), *extra])


def _table(markdown: str) -> list[dict[str, str]]:
    """The rows of the report's ranking table, by column name."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[1:]
    ]


def test_evaluate_ranks_first_the_layer_that_points_at_the_shapes(
    shapes_models_file: Path, shapes_folder: ShapesFolder, tmp_path: Path
) -> None:
    folder, labels = shapes_folder(40, HELD_OUT_SEED)
    output = tmp_path / "report"
    layers = [arg for layer in ("layer1", "layer2", "layer3") for arg in ("--layer", layer)]
    status = _evaluate(
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
    rows = _table((output / "report.md").read_text())
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
    assert page.count('src="data:image/png;base64,') == 3 * 6  # 6 thumbnails a row
    assert "<code>gradcam-service evaluate " in page  # the command to run it again
    for external in ('src="http', "<link", "<script", "url("):  # self-contained
        assert external not in page
    records = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 + 40 * 3  # the configuration, then one line per map


def test_ctrl_c_writes_the_report_so_far_and_the_same_command_carries_on(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(6, 7)
    output = tmp_path / "report"
    real = evaluate_module._evaluate_batch
    batches: list[int] = []

    def interrupted_at_the_second_batch(model: Any, chunk: Any, *args: Any) -> Any:
        batches.append(len(chunk))
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real(model, chunk, *args)

    options = ("--layer", "layer2", "--scores", "none", "--batch-size", "2")
    monkeypatch.setattr(evaluate_module, "_evaluate_batch", interrupted_at_the_second_batch)
    assert _evaluate(shapes_models_file, folder, labels, output, *options) == 130
    report = (output / "report.md").read_text()
    assert "INTERRUPTED" in report
    assert "2 of 6 images evaluated" in report
    assert len(_table(report)) == 1

    batches.clear()

    def counted(model: Any, chunk: Any, *args: Any) -> Any:
        batches.append(len(chunk))
        return real(model, chunk, *args)

    monkeypatch.setattr(evaluate_module, "_evaluate_batch", counted)
    assert _evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert batches == [2, 2]  # the 4 images left: the first 2 were not done again
    report = (output / "report.md").read_text()
    assert "INTERRUPTED" not in report
    assert "6 of 6 images evaluated" in report
    assert _table(report)[0]["images"] == "6"

    capsys.readouterr()
    other = ("--layer", "layer3", "--scores", "none")
    assert _evaluate(shapes_models_file, folder, labels, output, *other) == 2
    assert "--fresh" in capsys.readouterr().err
    assert _evaluate(shapes_models_file, folder, labels, output, *other, "--fresh") == 0


def test_unusable_images_and_labels_are_reported_not_fatal(
    shapes_models_file: Path, shapes_folder: ShapesFolder, tmp_path: Path
) -> None:
    folder, labels = shapes_folder(3, 11)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    entries = json.loads(labels.read_text())
    entries["shape01.png"]["label"] = "triangle"
    labels.write_text(json.dumps(entries))
    output = tmp_path / "report"
    status = _evaluate(shapes_models_file, folder, labels, output, "--layer", "layer2")
    assert status == 0
    report = (output / "report.md").read_text()
    assert "2 of 4 images evaluated" in report
    assert "broken.png" in report
    assert "triangle" in report
    assert _table(report)[0]["images"] == "2"


def test_masks_measure_the_object_as_boxes_covering_the_same_pixels_do(
    shapes_models_file: Path, shapes_folder: ShapesFolder, tmp_path: Path
) -> None:
    folder, labels = shapes_folder(6, 23)
    entries = json.loads(labels.read_text())
    masks = labels.parent / "masks"
    masks.mkdir()
    for name, entry in entries.items():
        ((left, top, right, bottom),) = entry["boxes"]
        with Image.open(folder / name) as image:
            width, height = image.size
        centres_x = np.arange(width) + 0.5
        centres_y = np.arange(height) + 0.5
        inside = ((centres_y >= top) & (centres_y <= bottom))[:, None] & (
            (centres_x >= left) & (centres_x <= right)
        )[None]
        Image.fromarray((inside * 255).astype(np.uint8)).save(masks / name)
    by_mask = labels.parent / "by_mask.json"
    by_mask.write_text(
        json.dumps(
            {name: {"label": e["label"], "mask": f"masks/{name}"} for name, e in entries.items()}
        )
    )
    options = ("--layer", "layer2", "--layer", "layer3", "--scores", "none")
    assert _evaluate(shapes_models_file, folder, labels, tmp_path / "boxes", *options) == 0
    assert _evaluate(shapes_models_file, folder, by_mask, tmp_path / "masks", *options) == 0
    measured = ("layer", "pointing_game", "energy_in_box")
    boxes_rows = _table((tmp_path / "boxes" / "report.md").read_text())
    mask_rows = _table((tmp_path / "masks" / "report.md").read_text())
    assert [[row[c] for c in measured] for row in mask_rows] == [
        [row[c] for c in measured] for row in boxes_rows
    ]
    assert any(float(row["energy_in_box"]) > 0 for row in mask_rows)


def test_an_empty_map_has_no_peak_so_it_misses_even_an_object_at_the_corner() -> None:
    region = np.zeros((8, 8), dtype=bool)
    region[:4, :4] = True  # the object covers pixel (0, 0), where argmax of zeros points
    empty = np.zeros((8, 8), dtype=np.float32)
    assert not evaluate_module.pointing_hit(empty, region)
    assert not evaluate_module.pointing_hit(empty, region, tolerance=3)
    assert evaluate_module.energy_inside(empty, region) == 0.0
    peaked = empty.copy()
    peaked[1, 2] = 0.5
    assert evaluate_module.pointing_hit(peaked, region)


def test_options_that_cannot_work_are_refused_before_any_image_is_read(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(2, 13)

    def no_image_may_be_read(*args: Any) -> Any:
        raise AssertionError("an image was read before the options were checked")

    monkeypatch.setattr(evaluate_module, "read_image", no_image_may_be_read)
    output = tmp_path / "report"
    for bad in (
        ("--rank-by", "bogus"),
        ("--batch-size", "0"),
        ("--batch-size", "-1"),
        ("--batch-size", "two"),
        ("--thumbnails", "-1"),
        ("--pointing-tolerance", "-1"),
        ("--pointing-tolerance", "nan"),
    ):
        with pytest.raises(SystemExit) as exited:
            _evaluate(shapes_models_file, folder, labels, output, *bad)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {bad[0]}" in err, err
        assert "Traceback" not in err
    with pytest.raises(SystemExit):
        _evaluate(shapes_models_file, folder, labels, output, "--rank-by", "bogus")
    err = " ".join(capsys.readouterr().err.split())
    assert "invalid choice: 'bogus'" in err
    assert "'pointing_game', 'energy_in_box', 'confidence_change'" in err  # the valid ones

    # Known measures that this run does not measure: one line, before any image.
    scores = ("--scores", "confidence_change")
    assert _evaluate(shapes_models_file, folder, labels, output, *scores, "--rank-by", "drop") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--rank-by drop" in err
    assert "confidence_change" in err
    no_boxes = tmp_path / "no_boxes.json"
    no_boxes.write_text(json.dumps({"shape00.png": {"label": "disk"}}))
    status = _evaluate(
        shapes_models_file, folder, no_boxes, output, *scores, "--rank-by", "pointing_game"
    )
    assert status == 2
    assert "boxes or masks" in capsys.readouterr().err
    assert not (output / "report.md").exists()


@pytest.mark.parametrize("inside", ["report", "."], ids=["output-in-folder", "output-is-folder"])
def test_a_second_run_does_not_evaluate_the_thumbnails_of_the_first(
    inside: str,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(3, 17)
    output = folder / inside
    options = ("--layer", "layer2", "--scores", "none")
    assert _evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert len(list((output / "thumbnails").glob("*.png"))) == 3
    capsys.readouterr()
    for again in ((), ("--fresh",)):
        assert _evaluate(shapes_models_file, folder, labels, output, *options, *again) == 0
        assert "left out 3 images of this command's output" in capsys.readouterr().err
        report = (output / "report.md").read_text()
        assert "3 of 3 images evaluated" in report
        assert _table(report)[0]["images"] == "3"


def _counting_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The images of each batch evaluated from now on."""
    real = evaluate_module._evaluate_batch
    batches: list[list[str]] = []

    def counted(model: Any, chunk: Any, *args: Any) -> Any:
        batches.append([name for _, _, name in chunk])
        return real(model, chunk, *args)

    monkeypatch.setattr(evaluate_module, "_evaluate_batch", counted)
    return batches


TWO_PAIRS = ("--layer", "layer2", "--layer", "layer3", "--scores", "none", "--batch-size", "3")


def test_a_torn_last_line_is_dropped_and_what_it_held_evaluated_again(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(3, 19)
    output = tmp_path / "report"
    assert _evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    results = output / "results.jsonl"
    data = results.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    assert json.loads(last)["image"] == "shape02.png"  # layer3's record of the last image
    results.write_bytes(data[: len(data) - len(last) // 2])  # killed half way through it
    capsys.readouterr()
    batches = _counting_batches(monkeypatch)
    assert _evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    assert "dropped its unfinished last line" in capsys.readouterr().err
    assert batches == [["shape02.png"]]
    rows = _table((output / "report.md").read_text())
    assert [row["images"] for row in rows] == ["3", "3"]  # shape02's layer2 record not twice
    for line in results.read_text().splitlines():
        json.loads(line)  # the next lines started on their own


def test_an_image_is_done_only_when_every_layer_and_method_is_recorded(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, labels = shapes_folder(3, 21)
    output = tmp_path / "report"
    assert _evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    results = output / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    # Ctrl-C while the batch was written: layer3's records of the last two images are missing.
    results.write_text("".join(lines[:-2]))
    batches = _counting_batches(monkeypatch)
    assert _evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    assert batches == [["shape01.png", "shape02.png"]]
    report = (output / "report.md").read_text()
    assert "3 of 3 images evaluated" in report
    assert [row["images"] for row in _table(report)] == ["3", "3"]
    # Their earlier layer2 records are still in the file: they must not count a third time.
    batches.clear()
    assert _evaluate(shapes_models_file, folder, labels, output, *TWO_PAIRS) == 0
    assert batches == []
    assert [row["images"] for row in _table((output / "report.md").read_text())] == ["3", "3"]


def test_damage_before_the_last_line_is_one_line_suggesting_fresh(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(2, 25)
    output = tmp_path / "report"
    options = ("--layer", "layer2", "--scores", "none")
    assert _evaluate(shapes_models_file, folder, labels, output, *options) == 0
    results = output / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text(lines[0] + '{"image": "shape00.p\n' + "".join(lines[2:]))
    capsys.readouterr()
    assert _evaluate(shapes_models_file, folder, labels, output, *options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "line 2" in err
    assert "--fresh" in err
    assert _evaluate(shapes_models_file, folder, labels, output, *options, "--fresh") == 0


def test_images_that_failed_are_tried_again_on_the_next_run(
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
    assert _evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert "2 of 3 images evaluated" in (output / "report.md").read_text()
    broken.write_bytes((folder / "shape00.png").read_bytes())  # the user fixed the file
    batches = _counting_batches(monkeypatch)
    assert _evaluate(shapes_models_file, folder, labels, output, *options) == 0
    assert batches == [["broken.png"]]
    report = (output / "report.md").read_text()
    assert "3 of 3 images evaluated" in report
    assert "skipped" not in report


def test_pictures_written_by_explain_in_the_folder_are_not_evaluated(
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
    assert _evaluate(shapes_models_file, folder, labels, tmp_path / "report", *options) == 0
    assert "left out 6 pictures written by gradcam-service explain" in capsys.readouterr().err
    assert "3 of 3 images evaluated" in (tmp_path / "report" / "report.md").read_text()
