"""Loading models: weights sources, checkpoint forms, labels, state after load, preprocessing."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import resolve_model_data_config

from service.engine import loading
from service.engine.hub import HubAccess
from service.engine.loading import load_model
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import Geometry, PreprocessConfig, map_to_original, preprocess
from service.engine.models.spec import ModelSpec, PreprocessOverrides
from service.errors import ModelLoadError, UnknownLayerError, UnknownTargetError

Loader = Callable[..., LoadedModel]
CPU = torch.device("cpu")
SMALL = {"channels": (8, 8, 16, 16), "stem_width": 8}
SMALL_INPUT = PreprocessOverrides(input_size=(64, 64), crop_pct=1.0)


def _spec(weights: str, **overrides: Any) -> ModelSpec:
    values: dict[str, Any] = {
        "name": "small",
        "architecture": "resnet18",
        "num_classes": 10,
        "weights": weights,
        "model_kwargs": SMALL,
        "preprocessing": SMALL_INPUT,
    }
    values.update(overrides)
    return ModelSpec(**values)


def _trained_like_state(num_classes: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """The state dict of a model with weights nobody would get by chance."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", num_classes=num_classes, **SMALL)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _assert_holds(model: LoadedModel, state: dict[str, torch.Tensor]) -> None:
    loaded = model.module.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_loads_a_local_safetensors_file(tmp_path: Path) -> None:
    state = _trained_like_state()
    path = tmp_path / "small.safetensors"
    save_file(state, str(path))
    model = load_model(_spec(str(path)), CPU)
    _assert_holds(model, state)
    assert model.weights.source == "safetensors"
    assert model.weights.location == str(path)
    assert not model.weights.random


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: s, id="plain"),
        pytest.param(lambda s: {"state_dict": s, "epoch": 3}, id="state_dict-key"),
        pytest.param(lambda s: {"model": s, "optimizer_step": 100}, id="model-key"),
        pytest.param(lambda s: {f"module.{k}": v for k, v in s.items()}, id="module-prefix"),
        pytest.param(
            lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
            id="state_dict-key-and-module-prefix",
        ),
    ],
)
def test_loads_a_pt_state_dict_in_its_common_wrappings(
    tmp_path: Path, wrap: Callable[[dict[str, torch.Tensor]], object]
) -> None:
    state = _trained_like_state()
    path = tmp_path / "small.pt"
    torch.save(wrap(state), path)
    model = load_model(_spec(str(path)), CPU)
    _assert_holds(model, state)
    assert model.weights.source == "state_dict"


def test_a_checkpoint_with_pickled_objects_is_refused_by_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": _trained_like_state(), "cfg": Path("x")}, path)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model(_spec(str(path)), CPU)


def test_a_checkpoint_for_another_head_names_the_mismatched_keys(tmp_path: Path) -> None:
    path = tmp_path / "five_classes.safetensors"
    save_file(_trained_like_state(num_classes=5), str(path))
    with pytest.raises(ModelLoadError, match="do not fit") as info:
        load_model(_spec(str(path)), CPU)
    assert "shape mismatches: fc.weight (checkpoint (5, 16), model (10, 16))" in info.value.detail
    assert "fc.bias" in info.value.detail


def test_a_checkpoint_with_missing_and_extra_keys_names_them(tmp_path: Path) -> None:
    state = _trained_like_state()
    del state["layer4.1.bn2.running_var"]
    state["projector.weight"] = torch.zeros(2, 2)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as info:
        load_model(_spec(str(path)), CPU)
    assert "missing keys: layer4.1.bn2.running_var" in info.value.detail
    assert "unexpected keys: projector.weight" in info.value.detail
    assert "odd.pt" in info.value.detail


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param([1, 2, 3], "no state dict of tensors", id="a-list"),
        pytest.param({"epoch": 3}, "no state dict of tensors", id="no-tensors"),
    ],
)
def test_a_file_without_a_state_dict_is_a_load_error(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "empty.pt"
    torch.save(content, path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(_spec(str(path)), CPU)


def test_a_missing_weights_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="Weights file not found"):
        load_model(_spec(str(tmp_path / "nowhere.safetensors")), CPU)


def test_weights_path_must_have_a_known_suffix() -> None:
    with pytest.raises(pydantic.ValidationError, match="weights must be"):
        _spec("model.onnx")


def test_unknown_architecture_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="timm has no architecture 'resnet_does_not_exist'"):
        load_model(_spec("random", architecture="resnet_does_not_exist"), CPU)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The hub answers the reachability check but ``pretrained=True`` fails (a download that
    breaks off)."""
    monkeypatch.setattr(loading, "hub_access", lambda: HubAccess(True))
    calls: list[bool] = []
    real_create = timm.create_model

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        calls.append(pretrained)
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    return calls


def test_unavailable_hub_weights_are_a_load_error_that_says_what_to_do(
    hub_offline: list[bool],
) -> None:
    with pytest.raises(ModelLoadError, match="hub weights for 'resnet18' could not be") as info:
        load_model(_spec("hub"), CPU)
    assert "OSError" in info.value.detail
    assert "fallback_to_random" in info.value.detail
    assert hub_offline == [True]


def test_unavailable_hub_weights_fall_back_to_random_when_allowed_and_say_so(
    hub_offline: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.engine.loading"):
        model = load_model(_spec("hub", fallback_to_random=True), CPU)
    assert hub_offline == [True, False]
    assert model.weights.random
    assert model.weights.source == "random"
    assert model.weights.note is not None
    assert "fell back to random" in model.weights.note
    assert "RANDOM WEIGHTS" in caplog.text


@pytest.fixture
def hub_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No hub, and an empty Hugging Face cache in ``tmp_path`` (the real libraries run)."""
    from huggingface_hub import constants

    monkeypatch.setattr(
        loading,
        "hub_access",
        lambda: HubAccess(False, "huggingface.co cannot be reached (Name or service not known)"),
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_an_unreachable_hub_falls_back_at_once_with_one_warning_that_says_why(
    hub_unreachable: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        model = load_model(_spec("hub", fallback_to_random=True), CPU)
    assert time.monotonic() - started < 10  # hub retries took about 47 s
    assert model.weights.random
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert "RANDOM WEIGHTS" in line
    assert "huggingface.co cannot be reached (Name or service not known)" in line
    assert "not in the local cache" in line
    assert "seeded from the model's name" in line
    assert "Loading pretrained weights from Hugging Face hub" not in caplog.text


def test_an_unreachable_hub_still_loads_weights_from_the_local_cache(
    hub_unreachable: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trained = timm.create_model("resnet18", num_classes=10, **SMALL)
    commit = "0" * 40
    repo = hub_unreachable / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(trained.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="service.engine.loading"):
        model = load_model(_spec("hub"), CPU)
    assert model.weights.source == "hub"
    assert not model.weights.random
    conv = model.module.get_submodule("conv1").weight
    assert torch.equal(conv, trained.get_submodule("conv1").weight)
    assert "from the local cache" in caplog.text


def test_the_hub_library_is_left_online_after_a_cache_only_load(hub_unreachable: Path) -> None:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    load_model(_spec("hub", fallback_to_random=True), CPU)
    assert before == constants.HF_HUB_OFFLINE


def test_random_weights_are_reported_as_requested(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    assert model.weights.random
    assert model.weights.note == "requested"


def test_a_thousand_class_model_gets_the_imagenet_label_names(load_tiny: Loader) -> None:
    labels = load_tiny("resnet18").labels
    assert len(labels) == 1000
    assert labels[0].startswith("tench")
    assert labels[1].startswith("goldfish")
    assert labels[999].startswith("toilet tissue")
    # ImageNet names two classes "crane" (the bird, 134, and the machine, 517).
    assert len(set(labels)) == 999
    assert labels[134] == labels[517] == "crane"


def test_a_label_naming_several_classes_is_refused_not_guessed(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    with pytest.raises(UnknownTargetError, match="134 \\(crane\\), 517 \\(crane\\)") as info:
        model.target("crane")
    assert info.value.code == "ambiguous_target"
    assert info.value.allowed == ["134", "517"]
    assert model.target("tabby") == model.target("tabby, tabby cat") == 281
    assert model.target("TENCH") == 0
    # The names offered to callers (the served OpenAPI enum) leave the ambiguous ones out.
    assert "crane" not in model.label_names()
    assert {"tabby", "tabby, tabby cat", "tench"} <= set(model.label_names())


def test_labels_given_as_a_list_are_used_in_order() -> None:
    names = [f"kind {i}" for i in range(10)]
    model = load_model(_spec("random", labels=names), CPU, warmup=False)
    assert model.labels == names
    assert model.target("kind 7") == 7


def test_without_labels_classes_are_numbered() -> None:
    model = load_model(_spec("random"), CPU, warmup=False)
    assert model.labels == [f"class_{i}" for i in range(10)]


@pytest.mark.parametrize("form", ["lines", "json"])
def test_labels_file_as_lines_or_json(tmp_path: Path, form: str) -> None:
    names = [f"label {i}" for i in range(10)]
    path = tmp_path / f"labels.{'txt' if form == 'lines' else 'json'}"
    text = "\n".join(names) + "\n\n" if form == "lines" else json.dumps(names)
    path.write_text(text, encoding="utf-8")
    model = load_model(_spec("random", labels_file=path), CPU, warmup=False)
    assert model.labels == names


def test_a_label_count_that_differs_from_the_classes_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="has 10 classes but 3 labels were given"):
        load_model(_spec("random", labels=["a", "b", "c"]), CPU, warmup=False)


def test_duplicate_labels_are_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="duplicate label"):
        load_model(_spec("random", labels=["same"] * 10), CPU, warmup=False)


def test_labels_and_labels_file_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="not both"):
        _spec("random", labels=["a"] * 10, labels_file=tmp_path / "x.txt")


def test_a_loaded_model_is_in_eval_mode_with_frozen_parameters(tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    save_file(_trained_like_state(), str(path))
    model = load_model(_spec(str(path)), CPU)
    assert not any(module.training for module in model.module.modules())
    parameters = list(model.module.parameters())
    assert parameters
    assert not any(parameter.requires_grad for parameter in parameters)
    # The warm-up explain ran and left the batch-norm statistics alone.
    bn = model.module.bn1
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert int(bn.num_batches_tracked) == 0


def test_preprocessing_comes_from_timms_data_config(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    config = resolve_model_data_config(model.module)
    assert model.preprocessing == PreprocessConfig(
        input_size=tuple(config["input_size"][1:]),
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
        crop_mode=config["crop_mode"],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


def test_preprocessing_overrides_replace_the_data_config_fields() -> None:
    overrides = PreprocessOverrides(
        input_size=(96, 128),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.3, 0.4),
    )
    model = load_model(_spec("random", preprocessing=overrides), CPU, warmup=False)
    assert model.preprocessing == PreprocessConfig(
        input_size=(96, 128),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.3, 0.4),
    )
    assert model.input_size == (96, 128)
    assert model.layer().grid == (3, 4)


def test_a_vit_created_at_another_size_preprocesses_at_that_size(load_tiny: Loader) -> None:
    """timm's data config keeps the default 224; the patch embedding knows the real size."""
    model = load_tiny("vit_tiny_patch16_224", depth=2, img_size=(160, 96))
    assert model.input_size == (160, 96)


def _image_with_square(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    pixels = np.full((height, width, 3), 40, dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels)


def _hot_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _square_input(crop_mode: str, crop_pct: float = 1.0) -> PreprocessConfig:
    """A 224x224 input, bilinear, mean and std 0.5, with the given crop."""
    return PreprocessConfig(
        input_size=(224, 224),
        interpolation="bilinear",
        crop_pct=crop_pct,
        crop_mode=crop_mode,  # type: ignore[arg-type]
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


@pytest.mark.parametrize(
    ("crop_mode", "crop_pct"),
    [("center", 1.0), ("center", 0.875), ("squash", 0.875), ("border", 1.0)],
)
def test_a_region_of_the_input_maps_back_onto_the_same_region_of_a_non_square_image(
    crop_mode: str, crop_pct: float
) -> None:
    """Round trip: a square drawn on a 300x200 image is found in the preprocessed tensor; a map
    that is hot exactly there lands back on the square in the original image."""
    square = (130, 60, 170, 100)
    image = _image_with_square(300, 200, square)
    config = _square_input(crop_mode, crop_pct)
    tensor, geometry = preprocess(image, config)
    assert tensor.shape == (3, 224, 224)
    assert geometry.original_size == (200, 300)
    hot_input = (tensor[0] > 0.5).numpy().astype(np.float32)  # the white square, normalised
    back = map_to_original(hot_input, geometry)
    assert back.shape == (200, 300)
    left, top, right, bottom = _hot_box(back > 0.5)
    for got, want in zip((left, top, right, bottom), square, strict=True):
        assert abs(got - want) <= 2


def test_in_border_mode_the_input_box_reaches_over_the_padding() -> None:
    """A 300x200 image fitted into 224x224 with padding above and below: the input's box spans
    the image's width and 300 original pixels of height, centred; the crop box is the image."""
    config = _square_input("border")
    _, geometry = preprocess(Image.new("RGB", (300, 200), "gray"), config)
    left, top, right, bottom = geometry.input_box()
    assert (left, right) == pytest.approx((0.0, 300.0))
    assert bottom - top == pytest.approx(300.0, abs=1.5)
    assert (top + bottom) / 2 == pytest.approx(100.0, abs=1.5)
    assert geometry.crop_box() == pytest.approx((0.0, 0.0, 300.0, 200.0))


def test_a_corner_of_the_input_lands_in_the_matching_corner_of_the_crop_window() -> None:
    """Center crop of a 300x200 (wide) image: the top-left input corner is at the left edge of
    the crop window, not of the image, and the cropped-away side strips are zero."""
    config = _square_input("center")
    _, geometry = preprocess(Image.new("RGB", (300, 200), "gray"), config)
    # Shorter side 200 -> 224 (x1.12); width 336, crop 56 px off each side = 50 original px.
    assert geometry.crop_box() == pytest.approx((50.0, 0.0, 250.0, 200.0))
    assert geometry.input_box() == geometry.crop_box()
    corner = np.zeros((224, 224), dtype=np.float32)
    corner[:56, :56] = 1.0  # the top-left quarter of the input, 50x50 original pixels
    back = map_to_original(corner, geometry)
    assert back.shape == (200, 300)
    assert _hot_box(back > 0.5) == (50, 0, 100, 50)
    assert not back[:, :50].any()
    assert not back[:, 250:].any()
    assert back.max() == pytest.approx(1.0, abs=1e-6)


def test_grey_images_are_converted_to_rgb_before_normalising() -> None:
    config = PreprocessConfig(
        input_size=(32, 32),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
        mean=(0.5, 0.4, 0.3),
        std=(0.5, 0.5, 0.5),
    )
    tensor, _ = preprocess(Image.new("L", (40, 30), 255), config)
    assert tensor.shape == (3, 32, 32)
    for channel, mean in enumerate(config.mean):
        torch.testing.assert_close(tensor[channel], torch.full((32, 32), (1.0 - mean) / 0.5))


# --- single-channel (grey) models -------------------------------------------------------------


def test_a_grey_model_takes_one_channel_with_timms_statistics_averaged() -> None:
    model = load_model(_spec("random", model_kwargs={**SMALL, "in_chans": 1}), CPU)
    timm_config = resolve_model_data_config(model.module)
    assert model.preprocessing.channels == 1
    assert model.preprocessing.mean == pytest.approx((sum(timm_config["mean"]) / 3,))
    assert model.preprocessing.std == pytest.approx((sum(timm_config["std"]) / 3,))
    assert model.layer().grid == (2, 2)  # layers were found with one-channel input


def _grey_config(size: int, mean: float, std: float) -> PreprocessConfig:
    """A grey model's preprocessing that keeps every pixel (squashed to its own size)."""
    return PreprocessConfig(
        input_size=(size, size),
        interpolation="nearest",
        crop_pct=1.0,
        crop_mode="squash",
        mean=(mean,),
        std=(std,),
        channels=1,
    )


def test_a_grey_model_gets_the_luminance_of_colour_images_normalised_by_its_one_value() -> None:
    config = _grey_config(8, mean=0.25, std=0.5)
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 200, 100, 50
    tensor, _ = preprocess(Image.fromarray(colour), config)
    assert tensor.shape == (1, 8, 8)
    luma = (200 * 299 + 100 * 587 + 50 * 114) / 1000  # ITU-R 601-2, as Pillow's "L"
    torch.testing.assert_close(
        tensor[0], torch.full((8, 8), (round(luma) / 255 - 0.25) / 0.5), atol=1e-6, rtol=0
    )


def test_grey_input_given_as_rgb_reaches_a_grey_model_unchanged() -> None:
    config = _grey_config(16, mean=0.0, std=1.0)
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tensor, _ = preprocess(Image.fromarray(grey).convert("RGB"), config)
    torch.testing.assert_close(tensor[0], torch.from_numpy(grey.astype(np.float32) / 255))


def test_a_grey_models_single_values_may_be_given_as_plain_numbers() -> None:
    spec = _spec(
        "random",
        model_kwargs={**SMALL, "in_chans": 1},
        preprocessing={"input_size": (64, 64), "mean": 0.5, "std": [0.25]},
    )
    model = load_model(spec, CPU, warmup=False)
    assert (model.preprocessing.mean, model.preprocessing.std) == ((0.5,), (0.25,))


def test_normalisation_values_that_do_not_match_the_channels_are_a_load_error() -> None:
    spec = _spec("random", preprocessing={"input_size": (64, 64), "mean": [0.5]})
    with pytest.raises(ModelLoadError, match=r"mean has 1 values but the model takes 3"):
        load_model(spec, CPU, warmup=False)


@pytest.mark.parametrize("in_chans", [2, 4, 0])
def test_unsupported_in_chans_fails_at_load_saying_what_is_supported(in_chans: int) -> None:
    spec = _spec("random", model_kwargs={**SMALL, "in_chans": in_chans})
    with pytest.raises(ModelLoadError, match=r"in_chans=\d is not supported.*\{in_chans: 1\}"):
        load_model(spec, CPU, warmup=False)


def _grid_sample_reference(grid_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """map_to_original as torch's grid_sample does it (bilinear, border, align_corners=False)."""
    height, width = geometry.original_size
    in_h, in_w = geometry.input_size
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * geometry.scale_x - geometry.offset_x
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * geometry.scale_y - geometry.offset_y
    gx = (2.0 * xs / in_w - 1.0).view(1, width).expand(height, width)
    gy = (2.0 * ys / in_h - 1.0).view(height, 1).expand(height, width)
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(0)
    source = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))[None, None]
    sampled = torch.nn.functional.grid_sample(
        source, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    seen = ((ys >= 0) & (ys < in_h)).view(height, 1) & ((xs >= 0) & (xs < in_w)).view(1, width)
    out = torch.where(seen, sampled[0, 0], torch.zeros(()))
    out = out - out.min()
    return (out / (out.max() + 1e-7)).numpy()


def test_map_to_original_equals_torch_grid_sample_on_random_geometries() -> None:
    rng = np.random.default_rng(7)
    for _ in range(100):
        grid_h, grid_w = (int(v) for v in rng.integers(1, 20, 2))
        geometry = Geometry(
            original_size=(int(rng.integers(1, 300)), int(rng.integers(1, 300))),
            input_size=(int(rng.integers(8, 300)), int(rng.integers(8, 300))),
            scale_x=float(rng.uniform(0.1, 3)),
            scale_y=float(rng.uniform(0.1, 3)),
            offset_x=float(rng.uniform(-50, 50)),
            offset_y=float(rng.uniform(-50, 50)),
        )
        grid_map = rng.random((grid_h, grid_w)).astype(np.float32)
        ours = map_to_original(grid_map, geometry)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, _grid_sample_reference(grid_map, geometry), atol=1e-5)


def test_any_synonym_of_a_label_names_its_class_in_any_case(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    assert model.target("tabby cat") == model.target("Tabby Cat") == 281
    assert model.target("giant panda") == model.target("panda bear") == 388
    # "panda" is a synonym of the giant panda (388) and of the lesser panda (387): not guessed.
    with pytest.raises(UnknownTargetError) as info:
        model.target("panda")
    assert info.value.code == "ambiguous_target"
    assert info.value.allowed == ["387", "388"]


def test_an_unknown_label_gets_close_names_not_a_thousand(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    with pytest.raises(UnknownTargetError, match="Did you mean 'tabby'") as info:
        model.target("tabbby")
    assert info.value.allowed is not None
    assert 1 <= len(info.value.allowed) <= 3


def test_an_unknown_layer_gets_did_you_mean_suggestions(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    with pytest.raises(UnknownLayerError, match="Did you mean 'layer4'") as info:
        model.layer("layer5")
    assert info.value.allowed is not None
    assert len(info.value.allowed) <= 3
    assert "layer4" in info.value.allowed


def test_a_class_index_out_of_range_is_said_without_a_doubled_quote(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    with pytest.raises(UnknownTargetError) as info:
        model.target(1000)
    assert info.value.detail == (
        "Class index 1000 is outside the 1000 classes of model 'resnet18' (0 to 999)."
    )


def test_random_weights_are_seeded_from_the_model_name_not_the_run() -> None:
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    first = load_model(_spec("random"), CPU, warmup=False).module.state_dict()
    assert torch.equal(torch.rand(1), before)  # the caller's random state is left alone
    torch.manual_seed(2)
    again = load_model(_spec("random"), CPU, warmup=False).module.state_dict()
    other = load_model(_spec("random", name="other"), CPU, warmup=False).module.state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
