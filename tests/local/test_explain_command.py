"""``gradcam-service explain``'s options: numbers out of range are refused by the parser, before
any model or image is loaded; a file that is not an image is skipped, in words of a file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from service.cli import main

ShapesFolder = Callable[..., tuple[Path, Path]]


def _explain(models_file: Path, *args: str) -> int:
    return main(["explain", *args, "--models-file", str(models_file)])


@pytest.mark.parametrize(
    "bad",
    [
        ("--batch-size", "0"),
        ("--batch-size", "-1"),
        ("--top-k", "0"),
        ("--alpha", "2"),
        ("--threshold", "-0.5"),
    ],
)
def test_numbers_out_of_range_are_refused_by_the_parser(
    bad: tuple[str, str],
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = shapes_folder(1, 9)
    with pytest.raises(SystemExit) as exited:
        _explain(shapes_models_file, str(folder), *bad)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {bad[0]}: expected a" in err
    assert not list(folder.glob("*.overlay.png"))


def test_a_local_file_that_is_not_an_image_is_named_and_not_called_an_upload(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = shapes_folder(1, 9)
    notes = folder / "notes.png"
    notes.write_text("a shopping list, named as a picture")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    assert _explain(shapes_models_file, str(folder), "--layer", "layer2") == 1
    err = capsys.readouterr().err
    assert f"skipped {notes}: not an image in any recognised format; use a JPEG, PNG" in err
    assert f"skipped {empty}: empty (0 bytes); use a JPEG, PNG" in err
    assert "upload" not in err
    assert "explained 1 of 3 images" in err
