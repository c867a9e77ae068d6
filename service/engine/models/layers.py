"""Which module outputs a CAM can be computed on, and how to turn each into a spatial grid.

A layer is any module whose output, for one forward pass, is a single tensor that is laid out
per image and has a spatial structure we can recover:

- ``channels_first``: (B, C, H, W), CNN feature maps;
- ``channels_last``: (B, H, W, C), e.g. timm Swin stages; permuted, never reshaped;
- ``tokens``: (B, N, C) from ViT-style blocks; the model's own prefix tokens (class,
  distillation, registers) are dropped and the rest reshaped to the model's patch grid.

Layers are found by running the model once with a forward hook on every module, so the listing
reflects what really runs at the configured input size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

Layout = Literal["channels_first", "channels_last", "tokens"]


@dataclass(frozen=True)
class LayerInfo:
    """One addressable layer."""

    name: str  # module path, e.g. "layer4" or "blocks.11.norm1"
    module_type: str  # class name, e.g. "Sequential"
    output_shape: tuple[int, ...]  # per image, e.g. (2048, 7, 7) or (197, 384)
    layout: Layout
    grid: tuple[int, int]  # (height, width) of the map this layer gives
    channels: int
    prefix_tokens: int = 0  # tokens dropped before reshaping (tokens layout only)
    layer_index: int | None = None  # the seed script's index, for top-level children only
    stage: bool = False  # one of the model's feature stages (see stage_names)

    def to_grid(self, tensor: torch.Tensor) -> torch.Tensor:
        """Turn this layer's (B, ...) output into (B, C, H, W)."""
        if self.layout == "channels_first":
            return tensor
        if self.layout == "channels_last":
            return tensor.permute(0, 3, 1, 2)
        height, width = self.grid
        patches = tensor[:, self.prefix_tokens :, :]
        return patches.reshape(tensor.shape[0], height, width, -1).permute(0, 3, 1, 2)


def _aspect_fits(dims: tuple[int, int], input_size: tuple[int, int]) -> bool:
    """Whether (h, w) can be a downsampled grid of an input of (H, W)."""
    h, w = dims
    in_h, in_w = input_size
    if h < 1 or w < 1 or h > in_h or w > in_w:
        return False
    return abs(h / w - in_h / in_w) <= 0.15 * (in_h / in_w) + 1.0 / min(h, w)


def _token_grid(
    model: nn.Module, tokens: int, input_size: tuple[int, int]
) -> tuple[int, tuple[int, int]] | None:
    """Return (prefix_tokens, grid) for a (B, N, C) output with N == tokens, or None."""
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    candidates: list[tuple[int, int]] = []
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        dynamic = getattr(patch_embed, "dynamic_feat_size", None)
        if callable(dynamic):
            with contextlib.suppress(Exception):  # some patch embeds only take their own size
                candidates.append(tuple(int(v) for v in dynamic(input_size)))  # type: ignore[arg-type]
        grid_size = getattr(patch_embed, "grid_size", None)
        if grid_size is not None:
            candidates.append((int(grid_size[0]), int(grid_size[1])))
    for grid in candidates:
        if tokens - prefix == grid[0] * grid[1]:
            return prefix, grid
    for skip in (prefix, 0):
        side = math.isqrt(tokens - skip) if tokens - skip > 0 else 0
        if side > 0 and side * side == tokens - skip:
            return skip, (side, side)
    return None


def _nhwc_model(model: nn.Module) -> bool:
    return str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC"


def classify_output(
    model: nn.Module, shape: tuple[int, ...], batch: int, input_size: tuple[int, int]
) -> tuple[Layout, tuple[int, int], int, int] | None:
    """Classify a module output shape as (layout, grid, channels, prefix) or None if unusable."""
    if len(shape) < 3 or shape[0] != batch:
        return None
    if len(shape) == 4:
        _, a, b, c = shape
        nchw = _aspect_fits((b, c), input_size)
        nhwc = _aspect_fits((a, b), input_size)
        if nchw and nhwc:
            nchw = not _nhwc_model(model)
            nhwc = not nchw
        if nhwc and not nchw:
            return "channels_last", (a, b), c, 0
        if nchw:
            return "channels_first", (b, c), a, 0
        return None
    if len(shape) == 3:
        _, tokens, channels = shape
        found = _token_grid(model, tokens, input_size)
        if found is None:
            return None
        prefix, grid = found
        return "tokens", grid, channels, prefix
    return None


def discover_layers(
    model: nn.Module, input_size: tuple[int, int], device: torch.device, channels: int = 3
) -> list[LayerInfo]:
    """Run the model once and list every module output a CAM can use, in forward order."""
    batch = 2
    seen: dict[str, list[object]] = {}
    order: list[str] = []

    def make_hook(name: str) -> object:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            if name not in seen:
                order.append(name)
                seen[name] = []
            seen[name].append(output.shape if isinstance(output, torch.Tensor) else None)

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(batch, channels, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()

    children = [name for name, _ in model.named_children()]
    index_of = {name: len(children) - 1 - i for i, name in enumerate(children)}
    modules = dict(model.named_modules())
    layers: list[LayerInfo] = []
    for name in order:
        outputs = seen[name]
        if len(outputs) != 1 or outputs[0] is None:
            continue  # called more than once per forward, or not a single tensor
        shape = tuple(int(v) for v in outputs[0])  # type: ignore[attr-defined]
        classified = classify_output(model, shape, batch, input_size)
        if classified is None:
            continue
        layout, grid, channels, prefix = classified
        layers.append(
            LayerInfo(
                name=name,
                module_type=type(modules[name]).__name__,
                output_shape=shape[1:],
                layout=layout,
                grid=grid,
                channels=channels,
                prefix_tokens=prefix,
                layer_index=index_of.get(name),
            )
        )
    stages = stage_names(model, layers)
    return [replace(layer, stage=layer.name in stages) for layer in layers]


def stage_names(model: nn.Module, layers: list[LayerInfo]) -> set[str]:
    """The layers a first look starts from: timm's feature stages (``feature_info``), else the
    model's top-level children that give a map (the original script's ``layer_idx`` ones)."""
    names = {layer.name for layer in layers}
    feature_info = getattr(model, "feature_info", None)
    stages: set[str] = set()
    if isinstance(feature_info, list):
        for info in feature_info:
            module = info.get("module") if isinstance(info, dict) else None
            if isinstance(module, str):
                stages.update({module, module.replace("_", ".")} & names)
    if not stages:
        stages = {layer.name for layer in layers if layer.layer_index is not None}
    return stages


def default_layer_name(model: nn.Module, layers: list[LayerInfo]) -> str | None:
    """The layer explained when the caller names none.

    Class-token ViTs: ``blocks[-1].norm1`` (the last block's output gets no gradient on its
    patch tokens under class-token pooling). Otherwise timm's last feature stage, else the last
    spatial layer that runs.
    """
    names = {layer.name for layer in layers}
    blocks = getattr(model, "blocks", None)
    if getattr(model, "global_pool", None) == "token" and isinstance(
        blocks, nn.Sequential | nn.ModuleList
    ):
        candidate = f"blocks.{len(blocks) - 1}.norm1"
        if candidate in names:
            return candidate
    feature_info = getattr(model, "feature_info", None)
    if isinstance(feature_info, list) and feature_info:
        module = feature_info[-1].get("module")
        if isinstance(module, str):
            for candidate in (module, module.replace("_", ".")):
                if candidate in names:
                    return candidate
    return layers[-1].name if layers else None
