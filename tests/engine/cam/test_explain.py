"""The explain entry point: targets, batches, layers, post-processing and every method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch

from service.engine.cam.costs import Cost, WorkAbandoned
from service.engine.cam.explain import (
    CamMap,
    ImageRequest,
    PostProcess,
    explain,
    explain_cost,
    postprocess,
    predict,
)
from service.engine.cam.methods import METHOD_NAMES, METHODS
from service.engine.models.loaded import LoadedModel
from service.errors import InvalidParameterError, UnknownLayerError, UnknownTargetError

Loader = Callable[..., LoadedModel]
MODELS = {
    "resnet": ("resnet18", {}, "layer4"),
    "vit": ("vit_tiny_patch16_224", {}, "blocks.11.norm1"),
}


def _verify_cam(cam: CamMap, grid: tuple[int, int], input_size: tuple[int, int]) -> None:
    """What every map must be: finite, the layer's grid, normalised maps in [0, 1]."""
    assert isinstance(cam, CamMap)
    assert cam.grid.shape == grid
    assert cam.grid_normalized.shape == grid
    assert cam.input_map.shape == input_size
    for array in (cam.grid, cam.grid_normalized, cam.input_map):
        assert array.dtype == np.float32
        assert np.isfinite(array).all()
    for array in (cam.grid_normalized, cam.input_map):
        assert array.min() >= 0.0
        assert array.max() <= 1.0
    assert np.isfinite([cam.raw_min, cam.raw_max, cam.logit, cam.probability]).all()
    assert 0.0 <= cam.probability <= 1.0


def _inputs(model: LoadedModel, batch: int, seed: int = 11) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.input_size, generator=generator)


def _load(load_tiny: Loader, key: str) -> tuple[LoadedModel, str]:
    arch, kwargs, layer = MODELS[key]
    return load_tiny(arch, **kwargs), layer


@pytest.mark.parametrize("key", list(MODELS))
def test_batch_maps_equal_each_image_explained_alone(load_tiny: Loader, key: str) -> None:
    model, layer = _load(load_tiny, key)
    x = _inputs(model, 3)
    requests = [
        ImageRequest(layers=(layer,), targets=(3,)),
        ImageRequest(layers=(layer,), top_k=2),
        ImageRequest(layers=(layer,), targets=(500, 7)),
    ]
    batch = explain(model, x, requests)
    assert [len(maps) for maps in batch.maps] == [1, 2, 2]
    for i, request in enumerate(requests):
        alone = explain(model, x[i : i + 1], [request])
        assert len(alone.maps[0]) == len(batch.maps[i])
        np.testing.assert_allclose(alone.probabilities[0], batch.probabilities[i], atol=1e-6)
        for together, single in zip(batch.maps[i], alone.maps[0], strict=True):
            assert together.image == i
            assert together.target == single.target
            assert np.abs(together.input_map - single.input_map).max() <= 1e-5
            assert np.abs(together.grid_normalized - single.grid_normalized).max() <= 1e-5


def test_each_image_gets_its_own_target_not_the_first_images(load_tiny: Loader) -> None:
    """The same image three times with three targets gives three different maps."""
    model, layer = _load(load_tiny, "resnet")
    x = _inputs(model, 1).repeat(3, 1, 1, 1)
    result = explain(model, x, [ImageRequest(layers=(layer,), targets=(t,)) for t in (1, 5, 9)])
    maps = [maps[0] for maps in result.maps]
    assert [m.target for m in maps] == [1, 5, 9]
    assert np.abs(maps[0].input_map - maps[1].input_map).max() > 0.05
    assert np.abs(maps[1].input_map - maps[2].input_map).max() > 0.05


def test_top_k_gives_k_maps_ordered_by_probability(load_tiny: Loader) -> None:
    model, layer = _load(load_tiny, "resnet")
    x = _inputs(model, 2)
    result = explain(model, x, [ImageRequest(layers=(layer,), top_k=3)] * 2)
    for i, maps in enumerate(result.maps):
        assert len(maps) == 3
        expected = np.argsort(-result.probabilities[i])[:3].tolist()
        assert [m.target for m in maps] == expected
        probabilities = [m.probability for m in maps]
        assert probabilities == sorted(probabilities, reverse=True)
        assert probabilities[0] == pytest.approx(float(result.probabilities[i].max()))


def test_label_names_and_digit_strings_resolve_to_class_indices(load_tiny: Loader) -> None:
    model, _ = _load(load_tiny, "resnet")
    assert model.num_classes == 1000
    assert model.target("tench") == 0
    assert model.target("TENCH") == 0
    assert model.target(model.labels[1]) == 1
    assert model.target("goldfish") == 1
    assert model.target("3") == 3
    assert model.target(999) == 999

    small = load_tiny(
        "resnet18", num_classes=3, labels=["cat", "dog", "Bird"], channels=(8, 8, 8, 8)
    )
    assert small.target("dog") == 1
    assert small.target("bird") == 2
    with pytest.raises(UnknownTargetError, match="no class labelled 'cow'") as info:
        small.target("cow")
    assert info.value.allowed == ["cat", "dog", "Bird"]


@pytest.mark.parametrize("value", [1000, -1, "1000", "-1"])
def test_class_index_out_of_range_is_an_unknown_target(load_tiny: Loader, value: object) -> None:
    model, _ = _load(load_tiny, "resnet")
    with pytest.raises(UnknownTargetError, match="outside"):
        model.target(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", [1000, -1])
def test_explain_rejects_out_of_range_targets_naming_the_image(
    load_tiny: Loader, target: int
) -> None:
    model, layer = _load(load_tiny, "resnet")
    requests = [
        ImageRequest(layers=(layer,), targets=(1,)),
        ImageRequest(layers=(layer,), targets=(2, target)),
    ]
    with pytest.raises(UnknownTargetError, match="outside") as info:
        explain(model, _inputs(model, 2), requests)
    assert info.value.image_index == 1
    assert info.value.code == "unknown_target"


@pytest.mark.parametrize("key", list(MODELS))
def test_several_layers_give_one_map_each_equal_to_single_layer_calls(
    load_tiny: Loader, key: str
) -> None:
    model, _ = _load(load_tiny, key)
    layers = (
        ("layer4", "layer3", "layer2")
        if key == "resnet"
        else ("blocks.11.norm1", "blocks.6.norm1", "blocks.2")
    )
    x = _inputs(model, 2)
    targets = [(4,), (8, 15)]
    together = explain(model, x, [ImageRequest(layers=layers, targets=t) for t in targets])
    for i, image_targets in enumerate(targets):
        maps = together.maps[i]
        assert [(m.target, m.layer) for m in maps] == [
            (t, layer) for t in image_targets for layer in layers
        ]
        for cam in maps:
            single = explain(model, x, [ImageRequest((cam.layer,), t) for t in targets])
            match = next(m for m in single.maps[i] if m.target == cam.target)
            assert cam.grid.shape == model.layer(cam.layer).grid
            assert np.abs(cam.input_map - match.input_map).max() <= 1e-5


def test_threshold_floors_at_a_fraction_of_the_maximum_and_divides_by_it() -> None:
    raw = torch.tensor([[[-1.0, 0.0], [2.0, 4.0]], [[-3.0, -1.0], [-2.0, -0.5]]])
    grid, normalized, input_map, raw_min, raw_max = postprocess(
        raw, PostProcess(mode="threshold", threshold=0.125), (8, 8)
    )
    # Image 0: floor 0.125 * 4 = 0.5.
    torch.testing.assert_close(grid[0], torch.tensor([[0.5, 0.5], [2.0, 4.0]]))
    torch.testing.assert_close(normalized[0], torch.tensor([[0.125, 0.125], [0.5, 1.0]]))
    assert input_map[0].min() >= 0.125 - 1e-6
    assert input_map[0].max() <= 1.0
    # Image 1 never goes above zero: all zeros, no NaN.
    for tensor in (grid[1], normalized[1], input_map[1]):
        assert torch.equal(tensor, torch.zeros_like(tensor))
    torch.testing.assert_close(raw_min, torch.tensor([-1.0, -3.0]))
    torch.testing.assert_close(raw_max, torch.tensor([4.0, -0.5]))


def test_relu_mode_zeroes_negatives_and_min_max_normalises() -> None:
    raw = torch.tensor([[[-1.0, 1.0], [2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    grid, normalized, input_map, _, _ = postprocess(raw, PostProcess(), (4, 4))
    torch.testing.assert_close(grid[0], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    torch.testing.assert_close(normalized[0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert input_map[0].min() == 0.0
    assert input_map[0].max() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(input_map[1], torch.zeros(4, 4))
    assert not torch.isnan(normalized).any()


def test_nan_and_infinite_raw_values_do_not_reach_the_maps() -> None:
    raw = torch.tensor([[[float("nan"), 1.0], [float("inf"), 2.0]]])
    for post in (PostProcess(), PostProcess(mode="threshold")):
        outputs = postprocess(raw, post, (4, 4))
        for tensor in outputs:
            assert torch.isfinite(tensor).all()


def test_threshold_mode_in_explain_keeps_the_floor_visible(load_tiny: Loader) -> None:
    model, layer = _load(load_tiny, "resnet")
    result = explain(
        model,
        _inputs(model, 2),
        [ImageRequest(layers=(layer,), targets=(t,)) for t in (1, 2)],
        post=PostProcess(mode="threshold", threshold=0.25),
    )
    for maps in result.maps:
        cam = maps[0]
        _verify_cam(cam, (7, 7), model.input_size)
        assert cam.raw_max > 0
        # The division is by (max + 1e-7): with a random network's small raw values (about
        # 1e-3 here) that shifts the floor and the peak by up to 1e-4 relative.
        floor = 0.25 * cam.raw_max
        assert cam.grid.max() == pytest.approx(cam.raw_max, rel=1e-6)
        assert cam.grid.min() == pytest.approx(max(floor, cam.raw_min), rel=1e-5)
        assert cam.grid_normalized.min() >= 0.25 - 1e-4
        assert cam.grid_normalized.max() == pytest.approx(1.0, abs=1e-4)
        assert cam.input_map.min() >= 0.25 - 1e-4
    assert any(maps[0].raw_min < 0.25 * maps[0].raw_max for maps in result.maps)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_outside_zero_to_one_is_an_invalid_parameter(threshold: float) -> None:
    with pytest.raises(InvalidParameterError, match="between 0 and 1"):
        PostProcess(mode="threshold", threshold=threshold)


def test_zero_gradient_layer_gives_all_zero_maps_not_nan(load_tiny: Loader) -> None:
    """Under class-token pooling the patch tokens of the last block's output get no gradient."""
    model, _ = _load(load_tiny, "vit")
    assert model.module.global_pool == "token"
    result = explain(
        model,
        _inputs(model, 2),
        [ImageRequest(layers=("blocks.11",), targets=(t,)) for t in (1, 2)],
    )
    for maps in result.maps:
        cam = maps[0]
        _verify_cam(cam, (14, 14), model.input_size)
        assert cam.raw_min == cam.raw_max == 0.0
        for array in (cam.grid, cam.grid_normalized, cam.input_map):
            assert not array.any()


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize(
    ("arch", "kwargs", "layer", "grid"),
    [
        pytest.param(
            "resnet18",
            {"channels": (16, 32, 64, 64), "stem_width": 16},
            "layer4",
            (4, 4),
            id="resnet",
        ),
        pytest.param(
            "vit_tiny_patch16_224",
            {"depth": 2, "img_size": 112},
            "blocks.1.norm1",
            (7, 7),
            id="vit",
        ),
    ],
)
def test_every_method_gives_finite_normalised_maps_on_the_layer_grid(
    load_tiny: Loader,
    method: str,
    arch: str,
    kwargs: dict[str, object],
    layer: str,
    grid: tuple[int, int],
) -> None:
    preprocessing = {"input_size": (128, 128)} if arch == "resnet18" else None
    model = load_tiny(arch, preprocessing=preprocessing, **kwargs)
    result = explain(
        model,
        _inputs(model, 2),
        [ImageRequest(layers=(layer,), targets=(3,)), ImageRequest(layers=(layer,), top_k=2)],
        method=method,
    )
    assert [len(maps) for maps in result.maps] == [1, 2]
    for maps in result.maps:
        for cam in maps:
            assert cam.method == method
            assert cam.layer == layer
            _verify_cam(cam, grid, model.input_size)
            assert cam.input_map.max() > 0.99  # a random network still gives a non-empty map


def test_method_registry_names_every_method_once() -> None:
    assert set(METHOD_NAMES) == {
        "gradcam",
        "gradcam++",
        "xgradcam",
        "hirescam",
        "layercam",
        "eigencam",
        "scorecam",
    }
    assert all(METHODS[name].name == name for name in METHOD_NAMES)


def test_unknown_method_is_an_invalid_parameter_listing_the_methods(load_tiny: Loader) -> None:
    model, layer = _load(load_tiny, "resnet")
    with pytest.raises(InvalidParameterError, match="Unknown method 'gradcam3'") as info:
        explain(model, _inputs(model, 1), [ImageRequest((layer,))], method="gradcam3")
    assert info.value.code == "unknown_method"
    assert info.value.allowed == list(METHOD_NAMES)


def test_eigencam_hot_side_follows_the_active_region() -> None:
    """The principal component's sign is fixed so that the map is hot where activations are,
    whichever sign the SVD returned."""
    generator = torch.Generator().manual_seed(0)
    pattern = torch.zeros(6, 6)
    pattern[1:3, 3:5] = 1.0
    loadings = torch.rand(16, generator=generator) + 0.5
    noise = 0.01 * torch.randn(2, 16, 6, 6, generator=generator)
    activations = loadings.view(1, 16, 1, 1) * pattern + noise
    activations[1] = activations[1] * 2.0
    raw = METHODS["eigencam"].combine(activations, None)
    for image in raw:
        assert image[1:3, 3:5].min() > image.max() * 0.5
        assert image[pattern == 0].max() < image.max() * 0.1


def test_explain_refuses_to_run_under_inference_mode(load_tiny: Loader) -> None:
    model, layer = _load(load_tiny, "resnet")
    x = _inputs(model, 1)
    with (
        torch.inference_mode(),
        pytest.raises(RuntimeError, match=r"inference_mode.*need gradients"),
    ):
        explain(model, x, [ImageRequest((layer,))])


def test_layer_index_counts_top_level_children_back_from_the_classifier(
    load_tiny: Loader,
) -> None:
    model, _ = _load(load_tiny, "resnet")
    assert model.layer_at(2).name == "layer4"
    assert model.layer_at(3).name == "layer3"
    assert model.layer_at(5).name == "layer1"
    assert model.layer_at(2).grid == (7, 7)
    assert model.layer_at(5).grid == (56, 56)
    requests = [ImageRequest(layers=(model.layer_at(i).name,), targets=(1,)) for i in (2, 5)]
    result = explain(model, _inputs(model, 2), requests)
    _verify_cam(result.maps[0][0], (7, 7), (224, 224))
    _verify_cam(result.maps[1][0], (56, 56), (224, 224))


def test_every_spatial_top_level_child_has_a_layer_index(load_tiny: Loader) -> None:
    """resnet18's children from the classifier end: fc 0, global_pool 1, layer4 2 ... conv1 9."""
    model, _ = _load(load_tiny, "resnet")
    indexed = {
        layer.layer_index: layer.name for layer in model.layers if layer.layer_index is not None
    }
    assert indexed == {
        2: "layer4",
        3: "layer3",
        4: "layer2",
        5: "layer1",
        6: "maxpool",
        7: "act1",
        8: "bn1",
        9: "conv1",
    }
    assert model.layer("layer4.1").layer_index is None


@pytest.mark.parametrize("index", [0, 1, 10, -1])
def test_layer_index_of_a_non_spatial_or_missing_child_lists_the_allowed_indices(
    load_tiny: Loader, index: int
) -> None:
    """0 is the classifier and 1 the global pool: neither is spatial."""
    model, _ = _load(load_tiny, "resnet")
    with pytest.raises(UnknownLayerError, match=f"layer_index {index} ") as info:
        model.layer_at(index)
    assert info.value.allowed == [str(i) for i in range(2, 10)]


def test_unknown_layer_name_is_refused_with_the_listing_hint(load_tiny: Loader) -> None:
    model, _ = _load(load_tiny, "resnet")
    with pytest.raises(UnknownLayerError, match="no usable layer 'layer9'") as info:
        explain(model, _inputs(model, 1), [ImageRequest(("layer9",))])
    assert info.value.allowed is not None
    assert "layer4" in info.value.allowed


def test_empty_layers_use_the_model_default_layer(load_tiny: Loader) -> None:
    model, _ = _load(load_tiny, "resnet")
    result = explain(model, _inputs(model, 1), [ImageRequest(layers=())])
    assert result.maps[0][0].layer == model.default_layer == "layer4"


def test_scorecam_over_its_forward_pass_budget_is_refused_before_running(
    load_tiny: Loader,
) -> None:
    model, layer = _load(load_tiny, "resnet")
    assert model.layer(layer).channels == 512
    requests = [ImageRequest(layers=(layer,), targets=(1, 2)), ImageRequest(layers=(layer,))]
    # One masked pass per channel and image, however many targets: 512 + 512.
    with pytest.raises(InvalidParameterError, match="1024 forward passes") as info:
        explain(model, _inputs(model, 2), requests, method="scorecam", max_forward_passes=1000)
    assert info.value.code == "scorecam_too_costly"


def test_scorecam_within_its_budget_runs(load_tiny: Loader) -> None:
    model = load_tiny(
        "resnet18",
        channels=(8, 8, 8, 8),
        stem_width=8,
        preprocessing={"input_size": (64, 64), "crop_pct": 1.0},
    )
    result = explain(
        model,
        _inputs(model, 1),
        [ImageRequest(layers=("layer4",), targets=(1,))],
        method="scorecam",
        max_forward_passes=8,
    )
    _verify_cam(result.maps[0][0], (2, 2), (64, 64))


def test_scorecam_targets_of_one_image_share_its_masked_forward_passes(
    load_tiny: Loader,
) -> None:
    model = load_tiny(
        "resnet18",
        channels=(8, 8, 8, 8),
        stem_width=8,
        preprocessing={"input_size": (64, 64), "crop_pct": 1.0},
    )
    inputs = _inputs(model, 1)
    seen: list[int] = []
    handle = model.module.register_forward_hook(
        lambda _m, args, _out: seen.append(int(args[0].shape[0]))
    )
    try:
        together = explain(
            model, inputs, [ImageRequest(layers=("layer4",), targets=(0, 1, 2))], method="scorecam"
        )
    finally:
        handle.remove()
    assert sum(seen) == 1 + 8, "one plain pass plus one masked pass per channel"
    for cam in together.maps[0]:
        (alone,) = explain(
            model, inputs, [ImageRequest(layers=("layer4",), targets=(cam.target,))], "scorecam"
        ).maps[0]
        np.testing.assert_allclose(cam.input_map, alone.input_map, atol=1e-6)


def test_request_count_must_match_the_batch(load_tiny: Loader) -> None:
    model, layer = _load(load_tiny, "resnet")
    with pytest.raises(ValueError, match="2 images but 1 requests"):
        explain(model, _inputs(model, 2), [ImageRequest((layer,))])


# --- multi-label models: sigmoid probabilities, targets by probability --------------------------


def _multi_label(load_tiny: Loader) -> tuple[LoadedModel, LoadedModel]:
    """The same tiny 6-class network as a softmax and as a sigmoid (multi-label) model."""
    softmax = load_tiny("resnet18", num_classes=6, preprocessing={"input_size": (64, 64)})
    spec = softmax.spec.model_copy(update={"activation": "sigmoid"})
    return softmax, dataclasses.replace(softmax, spec=spec)


def test_a_sigmoid_model_reports_an_independent_probability_per_class(load_tiny: Loader) -> None:
    softmax, sigmoid = _multi_label(load_tiny)
    x = _inputs(softmax, 2)
    with torch.no_grad():
        logits = softmax.module(x)
    np.testing.assert_allclose(predict(sigmoid, x), torch.sigmoid(logits).numpy(), rtol=1e-6)
    np.testing.assert_allclose(predict(softmax, x), torch.softmax(logits, -1).numpy(), rtol=1e-6)
    result = explain(sigmoid, x, [ImageRequest(top_k=2)] * 2)
    np.testing.assert_allclose(result.probabilities, torch.sigmoid(logits).numpy(), rtol=1e-6)
    assert result.maps[0][0].probability == pytest.approx(float(torch.sigmoid(logits[0]).max()))


def test_maps_follow_the_logit_whatever_the_activation(load_tiny: Loader) -> None:
    softmax, sigmoid = _multi_label(load_tiny)
    x = _inputs(softmax, 2)
    requests = [ImageRequest(targets=(1, 4)), ImageRequest(targets=(0,))]
    one, other = explain(softmax, x, requests), explain(sigmoid, x, requests)
    for maps_a, maps_b in zip(one.maps, other.maps, strict=True):
        for a, b in zip(maps_a, maps_b, strict=True):
            assert (a.target, a.logit) == (b.target, b.logit)
            np.testing.assert_array_equal(a.grid, b.grid)
            np.testing.assert_array_equal(a.input_map, b.input_map)
            assert a.probability != b.probability


def test_min_probability_explains_every_class_reaching_it_most_probable_first(
    load_tiny: Loader,
) -> None:
    _, sigmoid = _multi_label(load_tiny)
    x = _inputs(sigmoid, 2)
    probabilities = predict(sigmoid, x)
    floor = float(np.median(probabilities))
    result = explain(sigmoid, x, [ImageRequest(min_probability=floor, top_k=1)] * 2)
    for i, maps in enumerate(result.maps):
        expected = [int(c) for c in np.argsort(-probabilities[i], kind="stable")]
        expected = [c for c in expected if probabilities[i, c] >= floor]
        assert 1 <= len(expected) < sigmoid.num_classes
        assert [m.target for m in maps] == expected


def test_min_probability_above_every_class_explains_nothing(load_tiny: Loader) -> None:
    _, sigmoid = _multi_label(load_tiny)
    x = _inputs(sigmoid, 2)
    result = explain(sigmoid, x, [ImageRequest(min_probability=1.0)] * 2)
    assert result.maps == [[], []]
    assert result.probabilities.shape == (2, 6)


@pytest.mark.parametrize("value", [-0.1, 1.01])
def test_min_probability_outside_zero_to_one_is_an_invalid_parameter(value: float) -> None:
    with pytest.raises(InvalidParameterError, match="min_probability"):
        ImageRequest(min_probability=value)


def _count_forwards(model: LoadedModel) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Rows of every forward pass of ``model``'s module, as they happen."""
    rows: list[int] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        rows.append(int(args[0].shape[0]))

    return rows, model.module.register_forward_pre_hook(hook)


def test_scorecam_checks_in_before_each_masked_batch_with_the_cost_it_declared(
    load_tiny: Loader,
) -> None:
    model = load_tiny("resnet18", channels=(16, 32, 64, 64), stem_width=16)
    requests = [ImageRequest(layers=("layer4",), targets=(1, 2)), ImageRequest(layers=("layer3",))]
    chunks: list[Cost] = []
    explain(
        model,
        _inputs(model, 2),
        requests,
        method="scorecam",
        perturbation_batch_size=24,
        checkpoint=chunks.append,
    )
    # 64 channels at layer4 -> 24 + 24 + 16; 64 at layer3 -> the same; two targets share them.
    assert [chunk.forward_passes for chunk in chunks] == [24, 24, 16] * 2
    assert sum(chunk.forward_passes for chunk in chunks) == (
        explain_cost(model, "scorecam", requests).forward_passes
    )


def test_a_checkpoint_that_abandons_stops_scorecam_before_its_next_masked_batch(
    load_tiny: Loader,
) -> None:
    model = load_tiny("resnet18", channels=(16, 32, 64, 64), stem_width=16)
    calls = 0

    def checkpoint(_chunk: Cost) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise WorkAbandoned

    rows, handle = _count_forwards(model)
    try:
        with pytest.raises(WorkAbandoned):
            explain(
                model,
                _inputs(model, 1),
                [ImageRequest(layers=("layer4",))],
                method="scorecam",
                perturbation_batch_size=8,
                checkpoint=checkpoint,
            )
    finally:
        handle.remove()
    assert rows == [1, 8]  # the image's forward pass and one masked batch, of 8 needed


def test_gradient_methods_never_check_in(load_tiny: Loader) -> None:
    model = load_tiny("resnet18", channels=(16, 32, 64, 64), stem_width=16)
    chunks: list[Cost] = []
    explain(model, _inputs(model, 2), [ImageRequest(top_k=3)] * 2, checkpoint=chunks.append)
    assert chunks == []
