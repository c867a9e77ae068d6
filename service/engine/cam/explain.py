"""Predict and explain a batch: one forward pass, one backward pass per target round.

For a batch with per-image targets, each round selects one target per image and back-propagates
the sum of the selected logits. In eval mode every image's logit depends only on that image
(batch-norm uses running statistics, dropout is off), so each image receives exactly its own
gradient; images with fewer targets simply sit out later rounds. Gradients stop at the captured
layers (see :mod:`service.engine.cam.capture`), so explaining the last stage costs about one
forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from service.engine.cam.capture import LayerCapture
from service.engine.cam.costs import Checkpoint, Cost, CostLimits, check_cost, no_checkpoint
from service.engine.cam.methods import CamMethod, PerturbationContext, get_method
from service.engine.models.layers import LayerInfo
from service.engine.models.loaded import LoadedModel
from service.errors import InvalidParameterError, UnknownTargetError

PostMode = Literal["relu", "threshold"]


@dataclass(frozen=True)
class PostProcess:
    """How the raw map is rectified.

    ``relu`` (paper default): negatives become 0, then min-max normalisation.
    ``threshold``: the original script's floor; values under ``threshold * max`` are raised to
    it and the map is divided by its maximum, so the floor stays visible in the overlay.
    """

    mode: PostMode = "relu"
    threshold: float = 0.125

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise InvalidParameterError("threshold must be between 0 and 1.")

    @property
    def renormalizes(self) -> bool:
        """Whether a map resized onto another grid (the input, the upload, an overlay) is
        min-max normalised again, as the reference library does after ReLU. A threshold floor
        is part of the picture (the original script's 'adaptable threshold'): resized maps keep
        it rather than being normalised down to 0. The one home of this rule; the page's
        redraw (``static/render.js``) follows it and is tested against the server's overlay."""
        return self.mode == "relu"


#: Most classes one image explains when they are chosen by ``min_probability``.
MAX_PROBABILITY_TARGETS = 16


@dataclass(frozen=True)
class ImageRequest:
    """What to explain for one image of a batch.

    ``layers``: layer names; none means the model's default layer. ``targets``: explicit class
    indices; else, with ``min_probability``, every class whose probability reaches it (most
    probable first, at most :data:`MAX_PROBABILITY_TARGETS`; possibly none); else the ``top_k``
    predicted classes.
    """

    layers: tuple[str, ...] = ()
    targets: tuple[int, ...] | None = None
    top_k: int = 1
    min_probability: float | None = None

    def __post_init__(self) -> None:
        if self.min_probability is not None and not 0.0 <= self.min_probability <= 1.0:
            raise InvalidParameterError("min_probability must be between 0 and 1.")

    def most_targets(self, num_classes: int) -> int:
        """The most classes this request can explain on one image of a model with
        ``num_classes`` classes (explicit targets, else ``min_probability``'s cap, else
        ``top_k``): what bounds its cost and its answer's size before the model has run."""
        if self.targets is not None:
            return len(self.targets)
        if self.min_probability is not None:
            return min(MAX_PROBABILITY_TARGETS, num_classes)
        return max(1, min(self.top_k, num_classes))


@dataclass
class CamMap:
    """One explanation: one image, one target class, one layer."""

    image: int
    target: int
    probability: float
    logit: float
    layer: str
    method: str
    grid: np.ndarray  # (h, w) float32 on the feature grid, rectified, not normalised
    grid_normalized: np.ndarray  # (h, w) float32 in [0, 1]
    input_map: np.ndarray  # (H, W) float32 in [0, 1] at the model's input size
    raw_min: float  # range of the map before rectification and normalisation
    raw_max: float
    scores: dict[str, float] = field(default_factory=dict)  # see service.engine.faithfulness.scores


@dataclass
class ExplainResult:
    probabilities: np.ndarray  # (B, num_classes) float32
    maps: list[list[CamMap]]  # per image, ordered by target then layer


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation, exactly as the reference library does it."""
    flat = x.flatten(1)
    x = x - flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    return x / (x.flatten(1).max(dim=1).values.view(-1, *([1] * (x.dim() - 1))) + 1e-7)


def postprocess(
    cam: torch.Tensor, post: PostProcess, input_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, h, w) raw maps -> (grid, grid_normalized, input_map, raw_min, raw_max)."""
    cam = torch.nan_to_num(cam.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = cam.flatten(1)
    raw_min, raw_max = flat.min(dim=1).values, flat.max(dim=1).values
    if post.mode == "relu":
        grid = cam.clamp(min=0)
        normalized = _minmax(grid)
    else:
        peak = raw_max.clamp(min=0).view(-1, 1, 1)
        grid = torch.where(peak > 0, torch.maximum(cam, peak * post.threshold), 0.0)
        normalized = torch.where(peak > 0, grid / (peak + 1e-7), 0.0)
    upsampled = F.interpolate(
        normalized[:, None], size=input_size, mode="bilinear", align_corners=False
    )[:, 0]
    input_map = _minmax(upsampled) if post.renormalizes else upsampled.clamp(0.0, 1.0)
    return grid, normalized, input_map, raw_min, raw_max


def explain_cost(model: LoadedModel, method: str, requests: Sequence[ImageRequest]) -> Cost:
    """What ``method`` costs on ``requests`` (one per image) beyond their forward passes, as the
    method declares it, counted with the most targets each image can get."""
    cam_method = get_method(method)
    total = Cost()
    for request in requests:
        layers = [model.layer(name) for name in model.layer_names(request.layers)]
        total += cam_method.cost(layers, request.most_targets(model.num_classes))
    return total


def check_explain_cost(
    model: LoadedModel, method: str, requests: Sequence[ImageRequest], limit: int
) -> None:
    """Refuse, before any work, a request whose method needs more than ``limit`` forward passes
    on perturbed inputs (Score-CAM: one masked pass per channel of each layer and image)."""
    check_cost(
        explain_cost(model, method, requests),
        CostLimits(max_forward_passes=limit),
        subject=method,
        code=get_method(method).too_costly_code,
        advice="Use fewer images or layers, a layer with fewer channels, or a gradient method.",
    )


def predict(model: LoadedModel, inputs: torch.Tensor) -> np.ndarray:
    """Class probabilities (B, num_classes) without any gradient bookkeeping."""
    with torch.inference_mode(), model.autocast():
        logits = model.module(inputs.to(model.device))
    return model.probabilities(logits).cpu().numpy()


def _targets(
    model: LoadedModel, probabilities: torch.Tensor, requests: Sequence[ImageRequest]
) -> list[tuple[int, ...]]:
    chosen: list[tuple[int, ...]] = []
    for i, request in enumerate(requests):
        if request.targets is not None:
            for target in request.targets:
                if not 0 <= target < model.num_classes:
                    raise UnknownTargetError(
                        f"Class index {target} is outside the model's {model.num_classes} classes.",
                        image_index=i,
                    )
            chosen.append(tuple(request.targets))
        elif request.min_probability is not None:
            ranked = torch.sort(probabilities[i], descending=True, stable=True)
            above = ranked.values >= request.min_probability
            indices = ranked.indices[above][:MAX_PROBABILITY_TARGETS]
            chosen.append(tuple(int(c) for c in indices.tolist()))
        else:
            k = max(1, min(request.top_k, model.num_classes))
            chosen.append(tuple(int(c) for c in probabilities[i].topk(k).indices.tolist()))
    return chosen


def explain(
    model: LoadedModel,
    inputs: torch.Tensor,
    requests: Sequence[ImageRequest],
    method: str = "gradcam",
    post: PostProcess | None = None,
    *,
    perturbation_batch_size: int = 32,
    max_forward_passes: int | None = None,
    checkpoint: Checkpoint = no_checkpoint,
) -> ExplainResult:
    """Explain a batch (B, 3, H, W); ``requests[i]`` says what to explain for image ``i``.

    A method that runs the model on perturbed inputs does it in batches of
    ``perturbation_batch_size``, calling ``checkpoint`` before each (which may stop the call
    with :class:`~service.engine.cam.costs.WorkAbandoned`)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "explain() cannot run under torch.inference_mode(): CAM methods need gradients."
        )
    if len(requests) != inputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} images but {len(requests)} requests")
    cam_method = get_method(method)
    layers = [model.layer_names(r.layers) for r in requests]
    names = list(dict.fromkeys(name for per_image in layers for name in per_image))
    infos = {name: model.layer(name) for name in names}
    if max_forward_passes is not None:
        check_explain_cost(model, method, requests, max_forward_passes)
    inputs = inputs.to(model.device)

    grad_mode = torch.enable_grad() if cam_method.needs_gradients else torch.no_grad()
    with grad_mode:
        capture = LayerCapture(model.module, names, with_grad=cam_method.needs_gradients)
        with capture, model.autocast():
            logits = model.module(inputs)
        probabilities = model.probabilities(logits.detach())
        call = _Call(
            model=model,
            method=cam_method,
            post=post or PostProcess(),
            inputs=inputs,
            infos=infos,
            layers=layers,
            targets=_targets(model, probabilities, requests),
            outputs=capture.outputs,
            logits=logits,
            probabilities=probabilities.cpu(),
            perturbation_batch_size=perturbation_batch_size,
            checkpoint=checkpoint,
        )
        rounds = max(len(t) for t in call.targets)  # 0: no class reached min_probability
        for r in range(rounds):
            _round(call, r, last=r == rounds - 1)
    return ExplainResult(probabilities=call.probabilities.numpy(), maps=call.maps)


@dataclass
class _Call:
    """One explain call's state, shared by its target rounds."""

    model: LoadedModel
    method: CamMethod
    post: PostProcess
    inputs: torch.Tensor
    infos: dict[str, LayerInfo]
    layers: list[tuple[str, ...]]  # per image
    targets: list[tuple[int, ...]]  # per image
    outputs: dict[str, torch.Tensor]  # captured layer outputs, by layer
    logits: torch.Tensor  # (B, classes), in the graph when gradients are needed
    probabilities: torch.Tensor  # (B, classes) on the CPU
    perturbation_batch_size: int
    checkpoint: Checkpoint = no_checkpoint
    maps: list[list[CamMap]] = field(default_factory=list)
    # Score-CAM: logits of one image's masked inputs at one layer serve every target class.
    masked_logits: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    logits_cpu: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.maps = [[] for _ in self.layers]
        self.logits_cpu = self.logits.detach().float().cpu()

    def run_model(self, masked: torch.Tensor) -> torch.Tensor:
        """Logits of perturbed inputs, no gradient bookkeeping (Score-CAM); the checkpoint
        first, outside any mode or autocast."""
        self.checkpoint(Cost(forward_passes=masked.shape[0]))
        with torch.inference_mode(), self.model.autocast():
            logits: torch.Tensor = self.model.module(masked)
        return logits


def _round(call: _Call, r: int, *, last: bool) -> None:
    """Round ``r``: every image with an ``r``-th target gets its maps for that target.

    One backward pass of the sum of the selected logits serves the whole batch (each image's
    logit depends only on that image in eval mode).
    """
    rows = [i for i, targets in enumerate(call.targets) if len(targets) > r]
    needed = [name for name in call.infos if any(name in call.layers[i] for i in rows)]
    gradients: dict[str, torch.Tensor | None] = {}
    if call.method.needs_gradients:
        selected = call.logits[rows, [call.targets[i][r] for i in rows]].float().sum()
        grads = torch.autograd.grad(
            selected,
            [call.outputs[name] for name in needed],
            retain_graph=not last,
            allow_unused=True,
        )
        gradients = dict(zip(needed, grads, strict=True))
    for name in needed:
        info = call.infos[name]
        layer_rows = [i for i in rows if name in call.layers[i]]
        activations = info.to_grid(call.outputs[name][layer_rows].detach()).float()
        grid_grad = None
        if call.method.needs_gradients:
            grad = gradients.get(name)
            grid_grad = (
                torch.zeros_like(activations)
                if grad is None
                else info.to_grid(grad[layer_rows]).float()
            )
        perturbed = None
        if call.method.needs_model:
            perturbed = PerturbationContext(
                inputs=call.inputs[layer_rows],
                targets=torch.tensor([call.targets[i][r] for i in layer_rows]),
                run_model=call.run_model,
                batch_size=call.perturbation_batch_size,
                keys=[(i, name) for i in layer_rows],
                cache=call.masked_logits,
            )
        raw = call.method.combine(activations, grid_grad, perturbed)
        _add_maps(call, r, name, layer_rows, raw)


def _add_maps(call: _Call, r: int, layer: str, rows: list[int], raw: torch.Tensor) -> None:
    """Post-process one layer's raw maps for ``rows`` and file them under their images."""
    grid, normalized, input_map, lo, hi = postprocess(raw, call.post, call.model.input_size)
    grid_np, norm_np, input_np = (t.cpu().numpy() for t in (grid, normalized, input_map))
    lo_list, hi_list = lo.cpu().tolist(), hi.cpu().tolist()
    for j, i in enumerate(rows):
        target = call.targets[i][r]
        call.maps[i].append(
            CamMap(
                image=i,
                target=target,
                probability=float(call.probabilities[i, target]),
                logit=float(call.logits_cpu[i, target]),
                layer=layer,
                method=call.method.name,
                grid=grid_np[j],
                grid_normalized=norm_np[j],
                input_map=input_np[j],
                raw_min=float(lo_list[j]),
                raw_max=float(hi_list[j]),
            )
        )
