"""Predict and explain a batch: one forward pass, one backward pass per target round.

For a batch with per-image targets, each round selects one target per image and back-propagates
the sum of the selected logits. In eval mode every image's logit depends only on that image
(batch-norm uses running statistics, dropout is off), so each image receives exactly its own
gradient; images with fewer targets simply sit out later rounds. Gradients stop at the captured
layers (see :mod:`service.engine.capture`), so explaining the last stage costs about one
forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from service.engine.capture import LayerCapture
from service.engine.methods import ScoreContext, get_method
from service.engine.models import LoadedModel
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


@dataclass(frozen=True)
class ImageRequest:
    """What to explain for one image of a batch.

    ``layers``: resolved layer names (at least one). ``targets``: explicit class indices, or
    None for the ``top_k`` predicted classes.
    """

    layers: tuple[str, ...]
    targets: tuple[int, ...] | None = None
    top_k: int = 1


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
    input_map = _minmax(upsampled) if post.mode == "relu" else upsampled.clamp(0.0, 1.0)
    return grid, normalized, input_map, raw_min, raw_max


def check_scorecam_cost(
    model: LoadedModel, layers_per_image: Sequence[Sequence[str]], limit: int
) -> None:
    """Refuse a Score-CAM request that would need more than ``limit`` forward passes.

    One masked pass per channel of each layer and image; it serves every target class.
    """
    passes = sum(model.layer(name).channels for layers in layers_per_image for name in layers)
    if passes > limit:
        raise InvalidParameterError(
            f"scorecam would need {passes} forward passes for this request; the limit is"
            f" {limit}. Use fewer images or layers, a layer with fewer channels, or a gradient"
            " method.",
            code="scorecam_too_costly",
        )


def predict(model: LoadedModel, inputs: torch.Tensor) -> np.ndarray:
    """Class probabilities (B, num_classes) without any gradient bookkeeping."""
    with torch.inference_mode(), model.autocast():
        logits = model.module(inputs.to(model.device))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


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
    scorecam_batch_size: int = 32,
    max_forward_passes: int | None = None,
) -> ExplainResult:
    """Explain a batch (B, 3, H, W); ``requests[i]`` says what to explain for image ``i``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "explain() cannot run under torch.inference_mode(): CAM methods need gradients."
        )
    if len(requests) != inputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} images but {len(requests)} requests")
    cam_method = get_method(method)
    post = post or PostProcess()
    inputs = inputs.to(model.device)
    requests = [
        r if r.layers else ImageRequest((model.default_layer,), r.targets, r.top_k)
        for r in requests
    ]
    layer_names = list(dict.fromkeys(name for r in requests for name in r.layers))
    infos = {name: model.layer(name) for name in layer_names}
    if cam_method.needs_model and max_forward_passes is not None:
        check_scorecam_cost(model, [r.layers for r in requests], max_forward_passes)

    grad_mode = torch.enable_grad() if cam_method.needs_gradients else torch.no_grad()
    with grad_mode:
        capture = LayerCapture(model.module, layer_names, with_grad=cam_method.needs_gradients)
        with capture, model.autocast():
            logits = model.module(inputs)
        outputs = capture.outputs
        probabilities = torch.softmax(logits.detach().float(), dim=-1)
        targets = _targets(model, probabilities, requests)

        def run_model(masked: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), model.autocast():
                logits: torch.Tensor = model.module(masked)
            return logits

        probs_cpu = probabilities.cpu()
        logits_cpu = logits.detach().float().cpu()
        maps: list[list[CamMap]] = [[] for _ in requests]
        masked_logits: dict[tuple[int, str], torch.Tensor] = {}  # Score-CAM, shared by targets
        rounds = max(len(t) for t in targets)
        for r in range(rounds):
            rows = [i for i in range(len(requests)) if len(targets[i]) > r]
            classes = [targets[i][r] for i in rows]
            needed = [n for n in layer_names if any(n in requests[i].layers for i in rows)]
            gradients: dict[str, torch.Tensor | None] = {}
            if cam_method.needs_gradients:
                selected = logits[rows, classes].float().sum()
                grads = torch.autograd.grad(
                    selected,
                    [outputs[n] for n in needed],
                    retain_graph=r < rounds - 1,
                    allow_unused=True,
                )
                gradients = dict(zip(needed, grads, strict=True))
            for name in needed:
                info = infos[name]
                layer_rows = [i for i in rows if name in requests[i].layers]
                activations = info.to_grid(outputs[name][layer_rows].detach()).float()
                grad = gradients.get(name)
                grid_grad = None
                if cam_method.needs_gradients:
                    grid_grad = (
                        torch.zeros_like(activations)
                        if grad is None
                        else info.to_grid(grad[layer_rows]).float()
                    )
                score = None
                if cam_method.needs_model:
                    score = ScoreContext(
                        inputs=inputs[layer_rows],
                        targets=torch.tensor([targets[i][r] for i in layer_rows]),
                        run_model=run_model,
                        batch_size=scorecam_batch_size,
                        keys=[(i, name) for i in layer_rows],
                        cache=masked_logits,
                    )
                raw = cam_method.combine(activations, grid_grad, score)
                grid, normalized, input_map, lo, hi = postprocess(raw, post, model.input_size)
                grid_np, norm_np, input_np = (
                    grid.cpu().numpy(),
                    normalized.cpu().numpy(),
                    input_map.cpu().numpy(),
                )
                lo_list, hi_list = lo.cpu().tolist(), hi.cpu().tolist()
                for j, i in enumerate(layer_rows):
                    target = targets[i][r]
                    maps[i].append(
                        CamMap(
                            image=i,
                            target=target,
                            probability=float(probs_cpu[i, target]),
                            logit=float(logits_cpu[i, target]),
                            layer=name,
                            method=cam_method.name,
                            grid=grid_np[j],
                            grid_normalized=norm_np[j],
                            input_map=input_np[j],
                            raw_min=float(lo_list[j]),
                            raw_max=float(hi_list[j]),
                        )
                    )
    return ExplainResult(probabilities=probs_cpu.numpy(), maps=maps)
