"""One explain request's plan: the parameters a caller gives, resolved against the model.

Callers speak different dialects (the v1 API's form fields and JSON members, the local
commands' options, later other protocols); each turns what it was given into
:class:`ExplainParameters` and calls :func:`plan_explain`, before any image is read or any work
is queued. Every rule about what the parameters mean lives here, once: a layer by name or by
the original script's index, not both; repeats dropped; classes by index or by label; one way
of choosing the classes; a threshold floor instead of ReLU; the faithfulness scores' options.
A caller adds only what is its own: the HTTP layer says where to look names up, a command
says which option to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.engine.cam.costs import Cost
from service.engine.cam.explain import ImageRequest, PostProcess, explain_cost
from service.engine.cam.methods import get_method
from service.engine.faithfulness.scores import (
    DEFAULT_CURVE_STEP,
    DEFAULT_ROAD_PERCENTILES,
    ScoreName,
    ScoreOptions,
    most_maps,
)
from service.engine.models.loaded import LoadedModel
from service.errors import InvalidParameterError

#: The error code of parameters that exclude each other.
CONFLICTING = "conflicting_parameters"


@dataclass(frozen=True)
class ExplainParameters:
    """What a caller asks to explain, as given (names not yet resolved).

    None is a parameter not given, which is not the same as an empty one where two parameters
    exclude each other (``layer`` and ``layer_index``; ``min_probability`` and ``target`` or
    ``top_k``). ``targets``: class indices (int) or labels (str: a label, even when it is made
    of digits; text that may hold either is read with :func:`class_from_text`). ``top_k``: one
    class when not given.
    """

    layers: Sequence[str] | None = None
    layer_index: int | None = None
    targets: Sequence[int | str] | None = None
    top_k: int | None = None
    min_probability: float | None = None
    method: str = "gradcam"
    threshold: float | None = None
    scores: Sequence[ScoreName] = ()
    road_percentiles: Sequence[int] = DEFAULT_ROAD_PERCENTILES
    curve_step: float = DEFAULT_CURVE_STEP


@dataclass(frozen=True)
class ExplainPlan:
    """A request resolved against its model: the same for every image of the request."""

    request: ImageRequest
    method: str = "gradcam"
    post: PostProcess = field(default_factory=PostProcess)
    scores: ScoreOptions | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        """Resolved layer names; none: the model's default layer."""
        return self.request.layers

    def cost(self, model: LoadedModel) -> Cost:
        """What explaining one image costs on ``model`` beyond its forward pass: its method's
        declared cost and its scores', counted with the most targets it can get."""
        cost = explain_cost(model, self.method, [self.request])
        if self.scores is not None:
            cost += self.scores.cost(most_maps(model, self.request), 1)
        return cost

    @property
    def long(self) -> bool:
        """Whether it runs the model on perturbed inputs (its method or its scores): a long job,
        run alone and in slices, stopped when nobody waits for it."""
        return self.scores is not None or get_method(self.method).needs_model


def class_from_text(text: str) -> int | str:
    """A class given as text (a form field, a command-line option): digits are a class index,
    anything else a label."""
    return int(text) if text.lstrip("-").isdigit() else text


def resolve_layers(
    model: LoadedModel, names: Sequence[str] = (), indices: Sequence[int] = ()
) -> tuple[str, ...]:
    """Layers by module path and by the original script's ``layer_index``, in the order given,
    each once."""
    found = [model.layer(name).name for name in names]
    found += [model.layer_at(index).name for index in indices]
    return tuple(dict.fromkeys(found))


def resolve_targets(model: LoadedModel, targets: Sequence[int | str]) -> tuple[int, ...]:
    """Class indices (range-checked) and labels, as indices, in the order given, each once."""
    return tuple(
        dict.fromkeys(
            model.target(value) if isinstance(value, int) else model.label_target(value)
            for value in targets
        )
    )


def score_options(
    names: Sequence[ScoreName],
    road_percentiles: Sequence[int] = DEFAULT_ROAD_PERCENTILES,
    curve_step: float = DEFAULT_CURVE_STEP,
) -> ScoreOptions | None:
    """The faithfulness scores asked for, each once; None when none is. No percentiles means
    the default ones (a form can only leave the field out)."""
    if not names:
        return None
    return ScoreOptions(
        names=tuple(dict.fromkeys(names)),
        road_percentiles=tuple(road_percentiles) or DEFAULT_ROAD_PERCENTILES,
        curve_step=curve_step,
    )


def plan_explain(model: LoadedModel, params: ExplainParameters) -> ExplainPlan:
    """Resolve ``params`` against ``model``; unknown or conflicting values raise the engine's
    errors (:class:`InvalidParameterError`, ``UnknownLayerError``, ``UnknownTargetError``)."""
    if params.layers is not None and params.layer_index is not None:
        raise InvalidParameterError("Give 'layer' or 'layer_index', not both.", code=CONFLICTING)
    if params.min_probability is not None and (
        params.targets is not None or params.top_k is not None
    ):
        raise InvalidParameterError(
            "Give one way of choosing the classes: 'target', 'top_k' or 'min_probability'.",
            code=CONFLICTING,
        )
    get_method(params.method)  # an unknown method fails here, not in a worker
    indices = () if params.layer_index is None else (params.layer_index,)
    request = ImageRequest(
        layers=resolve_layers(model, params.layers or (), indices),
        targets=resolve_targets(model, params.targets or ()) or None,
        top_k=1 if params.top_k is None else params.top_k,
        min_probability=params.min_probability,
    )
    post = (
        PostProcess()
        if params.threshold is None
        else PostProcess(mode="threshold", threshold=params.threshold)
    )
    scores = score_options(params.scores, params.road_percentiles, params.curve_step)
    return ExplainPlan(request=request, method=params.method, post=post, scores=scores)
