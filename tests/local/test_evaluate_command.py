"""``gradcam-service evaluate``'s options: those that cannot work are refused, in one line,
before any image is read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.local.evaluate import runner

ShapesFolder = Callable[..., tuple[Path, Path]]
RunEvaluate = Callable[..., int]


def test_options_that_cannot_work_are_refused_before_any_image_is_read(
    run_evaluate: RunEvaluate,
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, labels = shapes_folder(2, 13)

    def no_image_may_be_read(*args: Any) -> Any:
        raise AssertionError("an image was read before the options were checked")

    monkeypatch.setattr(runner, "read_image", no_image_may_be_read)
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
            run_evaluate(shapes_models_file, folder, labels, output, *bad)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {bad[0]}" in err, err
        assert "Traceback" not in err
    with pytest.raises(SystemExit):
        run_evaluate(shapes_models_file, folder, labels, output, "--rank-by", "bogus")
    err = " ".join(capsys.readouterr().err.split())
    assert "invalid choice: 'bogus'" in err
    assert "'pointing_game', 'energy_in_box', 'confidence_change'" in err  # the valid ones

    # Known measures that this run does not measure: one line, before any image.
    scores = ("--scores", "confidence_change")
    assert (
        run_evaluate(shapes_models_file, folder, labels, output, *scores, "--rank-by", "drop") == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--rank-by drop" in err
    assert "confidence_change" in err
    no_boxes = tmp_path / "no_boxes.json"
    no_boxes.write_text(json.dumps({"shape00.png": {"label": "disk"}}))
    status = run_evaluate(
        shapes_models_file, folder, no_boxes, output, *scores, "--rank-by", "pointing_game"
    )
    assert status == 2
    assert "boxes or masks" in capsys.readouterr().err
    assert not (output / "report.md").exists()
