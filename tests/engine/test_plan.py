"""The explain plan: every caller's parameters resolved against the model in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.engine.cam.explain import PostProcess
from service.engine.faithfulness.scores import DEFAULT_ROAD_PERCENTILES
from service.engine.models.loaded import LoadedModel
from service.engine.plan import (
    ExplainParameters,
    class_from_text,
    plan_explain,
    resolve_layers,
)
from service.errors import InvalidParameterError, UnknownLayerError, UnknownTargetError

Loader = Callable[..., LoadedModel]
LABELS = ["cat", "dog", "tabby, tabby cat", "Crane", "crane"]


@pytest.fixture(scope="module")
def model(load_tiny: Loader) -> LoadedModel:
    return load_tiny("resnet18", num_classes=5, labels=LABELS)


def _plan(model: LoadedModel, **given: Any) -> Any:
    return plan_explain(model, ExplainParameters(**given))


def test_nothing_given_plans_the_default_layer_and_the_top_class(model: LoadedModel) -> None:
    plan = _plan(model)
    assert plan.layers == ()  # the engine applies the model's default layer
    assert plan.request.targets is None
    assert plan.request.top_k == 1
    assert plan.method == "gradcam"
    assert plan.post == PostProcess()
    assert plan.scores is None


def test_layer_and_layer_index_together_are_refused(model: LoadedModel) -> None:
    with pytest.raises(InvalidParameterError, match="not both") as refused:
        _plan(model, layers=["layer4"], layer_index=2)
    assert refused.value.code == "conflicting_parameters"


def test_an_empty_layer_list_given_with_layer_index_is_still_two_ways(model: LoadedModel) -> None:
    """A JSON body that sends "layer": [] and a layer_index gives both (the schema says not)."""
    with pytest.raises(InvalidParameterError, match="not both"):
        _plan(model, layers=[], layer_index=2)


def test_layer_index_is_the_original_scripts_count_back_from_the_classifier(
    model: LoadedModel,
) -> None:
    assert _plan(model, layer_index=2).layers == ("layer4",)
    assert _plan(model, layer_index=5).layers == ("layer1",)


def test_repeated_layers_and_classes_are_planned_once_in_the_order_given(
    model: LoadedModel,
) -> None:
    plan = _plan(model, layers=["layer3", "layer4", "layer3"], targets=["dog", 1, 0, "cat"])
    assert plan.layers == ("layer3", "layer4")
    assert plan.request.targets == (1, 0)


def test_a_label_made_of_digits_is_a_label_and_text_digits_are_an_index(
    load_tiny: Loader,
) -> None:
    numbered = load_tiny("resnet18", num_classes=3, labels=["7", "8", "9"])
    assert _plan(numbered, targets=["7"]).request.targets == (0,)
    assert _plan(numbered, targets=[class_from_text("2")]).request.targets == (2,)
    assert class_from_text("tabby") == "tabby"
    assert class_from_text("-1") == -1


def test_unknown_names_raise_the_engines_errors(model: LoadedModel) -> None:
    with pytest.raises(UnknownLayerError):
        _plan(model, layers=["layer9"])
    with pytest.raises(UnknownLayerError):
        _plan(model, layer_index=40)
    with pytest.raises(UnknownTargetError):
        _plan(model, targets=[5])
    with pytest.raises(UnknownTargetError) as ambiguous:
        _plan(model, targets=["CRANE"])
    assert ambiguous.value.code == "ambiguous_target"


@pytest.mark.parametrize("other", [{"targets": [1]}, {"targets": []}, {"top_k": 2}])
def test_min_probability_is_a_third_way_of_choosing_classes_not_a_filter(
    model: LoadedModel, other: dict[str, Any]
) -> None:
    with pytest.raises(InvalidParameterError, match="one way") as refused:
        _plan(model, min_probability=0.5, **other)
    assert refused.value.code == "conflicting_parameters"
    assert _plan(model, min_probability=0.5).request.min_probability == 0.5


def test_a_threshold_replaces_relu_with_the_original_scripts_floor(model: LoadedModel) -> None:
    assert _plan(model, threshold=0.125).post == PostProcess(mode="threshold", threshold=0.125)
    assert _plan(model, threshold=None).post.mode == "relu"


def test_an_unknown_method_is_refused_while_planning(model: LoadedModel) -> None:
    with pytest.raises(InvalidParameterError) as refused:
        _plan(model, method="magiccam")
    assert refused.value.code == "unknown_method"


def test_scores_are_planned_once_each_and_no_percentiles_means_the_defaults(
    model: LoadedModel,
) -> None:
    plan = _plan(model, scores=["road", "drop", "road"], road_percentiles=[])
    assert plan.scores is not None
    assert plan.scores.names == ("road", "drop")
    assert plan.scores.road_percentiles == DEFAULT_ROAD_PERCENTILES
    assert _plan(model, scores=[]).scores is None


def test_resolve_layers_takes_names_and_indices_together_for_evaluate(
    model: LoadedModel,
) -> None:
    assert resolve_layers(model, ["layer4", "layer3"], [2, 5]) == ("layer4", "layer3", "layer1")
