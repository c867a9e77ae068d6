"""``gradcam-service explain`` end to end, in process: the original script's outputs next to
each image, the same maps as the engine gives, and the API's options."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.engine.cam.explain import ImageRequest, PostProcess, explain
from service.engine.imaging.images import decode_image
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import preprocess
from service.local import explain_files as explain_files_module

ShapesFolder = Callable[..., tuple[Path, Path]]


def _explain(models_file: Path, *args: str) -> int:
    return main(["explain", *args, "--models-file", str(models_file)])


def _size(path: Path | str) -> tuple[int, int]:
    with Image.open(path) as picture:
        return picture.size


def test_explain_writes_overlay_panel_and_raw_map_next_to_each_image(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    shapes_model: LoadedModel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = shapes_folder(3, 5)
    (folder / "notes.txt").write_text("not an image, not an image file name either")
    status = _explain(
        shapes_models_file,
        str(folder),
        "--layer",
        "layer2",
        "--target",
        "disk",
        "--threshold",
        "0.125",
        "--colormap",
        "viridis",
    )
    assert status == 0
    assert "explained 3 of 3 images" in capsys.readouterr().err
    for image in sorted(folder.glob("shape??.png")):
        stem = folder / f"{image.stem}.gradcam.layer2.disk"
        assert _size(f"{stem}.overlay.png") == _size(image) == (64, 64)
        assert _size(f"{stem}.panel.png")[0] > 3 * 64
        raw = np.load(f"{stem}.npy")
        # The map the engine gives for the same file, class and options.
        tensor, _ = preprocess(decode_image(image.read_bytes()).image, shapes_model.preprocessing)
        cam = explain(
            shapes_model,
            tensor[None],
            [ImageRequest(layers=("layer2",), targets=(2,))],
            post=PostProcess(mode="threshold", threshold=0.125),
        ).maps[0][0]
        assert raw.shape == (8, 8)
        np.testing.assert_allclose(raw, cam.grid, atol=1e-6)
        assert raw.min() >= 0.125 * raw.max() - 1e-6  # the threshold floor, not ReLU
    assert len(list(folder.glob("*.overlay.png"))) == 3


def test_layer_index_and_top_k_choose_as_the_api_does(
    shapes_models_file: Path, shapes_folder: ShapesFolder
) -> None:
    folder, _ = shapes_folder(1, 6)
    image = folder / "shape00.png"
    assert _explain(shapes_models_file, str(image), "--layer-index", "2", "--top-k", "2") == 0
    written = sorted(p.name for p in folder.glob("*.npy"))
    assert len(written) == 2  # two classes, layer_idx 2 = layer4 on a ResNet
    assert all(name.startswith("shape00.gradcam.layer4.") for name in written)
    assert np.load(folder / written[0]).shape == (2, 2)


def test_bad_options_and_files_are_one_line_each(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = shapes_folder(1, 8)
    assert _explain(shapes_models_file, str(folder), "--layer", "layer9") == 2
    assert "no usable layer 'layer9'" in capsys.readouterr().err
    assert _explain(shapes_models_file, str(folder), "--target", "triangle") == 2
    assert "triangle" in capsys.readouterr().err
    assert _explain(shapes_models_file, str(tmp_path / "missing.png")) == 2
    assert "no such file" in capsys.readouterr().err
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    assert _explain(shapes_models_file, str(folder)) == 1  # the good one is still explained
    err = capsys.readouterr().err
    assert "skipped" in err
    assert "broken.png" in err
    assert "explained 1 of 2 images" in err
    assert not list(folder.glob("broken.*.png"))


def test_a_second_run_leaves_out_the_pictures_of_the_first(
    shapes_models_file: Path, shapes_folder: ShapesFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = shapes_folder(2, 12)
    options = ("--layer", "layer2", "--target", "disk")
    assert _explain(shapes_models_file, str(folder), *options) == 0
    capsys.readouterr()
    assert _explain(shapes_models_file, str(folder), *options) == 0
    err = capsys.readouterr().err
    assert "explained 2 of 2 images" in err
    assert "left out 4 pictures of an earlier explain" in err
    assert sorted(p.name for p in folder.glob("*.overlay.png")) == [
        "shape00.gradcam.layer2.disk.overlay.png",
        "shape01.gradcam.layer2.disk.overlay.png",
    ]
    # Named on the command line, a picture is explained like any image.
    overlay = folder / "shape00.gradcam.layer2.disk.overlay.png"
    assert _explain(shapes_models_file, str(overlay), *options) == 0
    assert (folder / "shape00.gradcam.layer2.disk.overlay.gradcam.layer2.disk.npy").exists()


def test_images_sharing_a_stem_and_classes_sharing_a_label_get_their_own_files(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = shapes_folder(2, 14)
    with Image.open(folder / "shape00.png") as picture:
        picture.save(folder / "shape00.jpg")
    # The same model, its first two classes labelled alike but for case.
    entry = json.loads(shapes_models_file.read_text())["models"][0]
    entry["labels"] = ["crane", "Crane", *entry["labels"][2:]]
    twins = tmp_path / "twins.json"
    twins.write_text(json.dumps({"models": [entry]}))
    status = _explain(twins, str(folder), "--layer", "layer2", "--target", "0", "--target", "1")
    assert status == 0
    assert "explained 3 of 3 images" in capsys.readouterr().err
    assert sorted(p.name for p in folder.glob("*.npy")) == [
        f"{stem}.gradcam.layer2.{label}.npy"
        for stem in ("shape00.jpg", "shape00.png", "shape01")
        for label in ("Crane.1", "crane.0")
    ]


def test_a_map_is_never_written_over_another_of_the_same_run(
    shapes_models_file: Path,
    shapes_folder: ShapesFolder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = shapes_folder(1, 15)
    # Were two classes ever named alike, the second map must be refused, not written over the first.
    monkeypatch.setattr(explain_files_module, "class_names", lambda labels: ["same"] * 3)
    assert _explain(shapes_models_file, str(folder), "--layer", "layer2", "--top-k", "2") == 1
    err = capsys.readouterr().err
    assert "shape00.gradcam.layer2.same.* was written earlier in this run" in err
    assert "1 maps" in err
    assert len(list(folder.glob("*.npy"))) == 1


def test_class_names_add_the_index_only_where_labels_would_share_a_file_name() -> None:
    from timm.data import ImageNetInfo

    labels = [ImageNetInfo().index_to_description(i) for i in range(1000)]
    names = explain_files_module.class_names(labels)
    assert (labels[134], labels[517]) == ("crane", "crane")
    assert (names[134], names[517]) == ("crane.134", "crane.517")
    assert names[281] == "tabby_tabby_cat"  # "tabby, tabby cat": unique, no index
    assert len({name.casefold() for name in names}) == 1000
    assert explain_files_module.class_names(["a b", "a/b", "c"]) == ["a_b.0", "a_b.1", "c"]


def test_a_wide_image_gets_its_cropped_ends_hatched_and_the_summary_says_so(
    shapes_models_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shapes model centre-crops a 96x64 image to its middle 64x64: the 16 columns at
    each end are drawn grey (hatched) in the overlay, whatever the map, and said so once."""
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "w.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    assert _explain(shapes_models_file, str(tmp_path), "--alpha", "1") == 0
    err = capsys.readouterr().err
    assert "the model's crop left out part of 1 of the images" in err
    assert "hatched: not seen by the model" in err
    (overlay,) = tmp_path.glob("w.*.overlay.png")
    drawn = np.asarray(Image.open(overlay).convert("RGB")).astype(np.int16)
    for end in (drawn[:, :15], drawn[:, -15:]):
        assert (end[..., 0] == end[..., 1]).all()
        assert (end[..., 1] == end[..., 2]).all()
    middle = drawn[:, 17:-17]
    assert (np.abs(middle[..., 0] - middle[..., 2]) > 0).mean() > 0.5, "the middle is grey"
