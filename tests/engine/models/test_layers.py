"""Layer discovery on CNNs and token models: default layer, layout, grid, prefix tokens.

Depths are shrunk through ``model_kwargs`` where that keeps the structure (prefix tokens, patch
grid, pooling) and saves time; the full-size ViT and ResNet are also checked, with the default
layer that REFERENCE.md section 3 names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from service.engine.cam.explain import ImageRequest, explain
from service.engine.models.layers import LayerInfo, discover_layers
from service.engine.models.loaded import LoadedModel

Loader = Callable[..., LoadedModel]


@dataclass(frozen=True)
class Case:
    arch: str
    default_layer: str
    layout: str
    grid: tuple[int, int]
    input_size: tuple[int, int]
    prefix_tokens: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    preprocessing: dict[str, Any] | None = None


CASES = {
    # CNNs: timm's last feature stage.
    "resnet18": Case("resnet18", "layer4", "channels_first", (7, 7), (224, 224)),
    "resnet18-160x224": Case(
        "resnet18",
        "layer4",
        "channels_first",
        (5, 7),
        (160, 224),
        preprocessing={"input_size": (160, 224)},
    ),
    "efficientnet_b0": Case("efficientnet_b0", "blocks.6", "channels_first", (7, 7), (224, 224)),
    "efficientnet_b0-160x224": Case(
        "efficientnet_b0",
        "blocks.6",
        "channels_first",
        (5, 7),
        (160, 224),
        preprocessing={"input_size": (160, 224)},
    ),
    "convnext_atto": Case("convnext_atto", "stages.3", "channels_first", (7, 7), (224, 224)),
    "convnext_atto-256x192": Case(
        "convnext_atto",
        "stages.3",
        "channels_first",
        (8, 6),
        (256, 192),
        preprocessing={"input_size": (256, 192)},
    ),
    # Class-token ViT: the last block's norm1 (its output gets no patch-token gradient).
    "vit_tiny": Case("vit_tiny_patch16_224", "blocks.11.norm1", "tokens", (14, 14), (224, 224), 1),
    "vit_tiny-160x96": Case(
        "vit_tiny_patch16_224",
        "blocks.1.norm1",
        "tokens",
        (10, 6),
        (160, 96),
        1,
        {"depth": 2, "img_size": (160, 96)},
    ),
    "vit_tiny-384": Case(
        "vit_tiny_patch16_224",
        "blocks.1.norm1",
        "tokens",
        (24, 24),
        (384, 384),
        1,
        {"depth": 2, "img_size": 384},
    ),
    # The same for a class-token ViT whose blocks are a ModuleList (timm's Eva family).
    "vit_rope": Case(
        "vit_small_patch16_rope_224",
        "blocks.1.norm1",
        "tokens",
        (14, 14),
        (224, 224),
        1,
        {"depth": 2},
    ),
    # Pooled ViTs: no class token, the last block itself.
    "vit_tiny-avgpool": Case(
        "vit_tiny_patch16_224",
        "blocks.1",
        "tokens",
        (14, 14),
        (224, 224),
        0,
        {"depth": 2, "global_pool": "avg", "class_token": False},
    ),
    "vit_reg4_gap": Case(
        "vit_base_patch16_reg4_gap_256",
        "blocks.1",
        "tokens",
        (16, 16),
        (256, 256),
        4,
        {"depth": 2, "embed_dim": 64, "num_heads": 2},
    ),
    "vit_reg4_gap-192x128": Case(
        "vit_base_patch16_reg4_gap_256",
        "blocks.1",
        "tokens",
        (12, 8),
        (192, 128),
        4,
        {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": (192, 128)},
    ),
    # DeiT distilled: class and distillation tokens.
    "deit_distilled": Case(
        "deit_tiny_distilled_patch16_224",
        "blocks.1.norm1",
        "tokens",
        (14, 14),
        (224, 224),
        2,
        {"depth": 2},
    ),
    "deit_distilled-160x96": Case(
        "deit_tiny_distilled_patch16_224",
        "blocks.1.norm1",
        "tokens",
        (10, 6),
        (160, 96),
        2,
        {"depth": 2, "img_size": (160, 96)},
    ),
    # DINOv2 with 4 registers: 5 prefix tokens, patch 14 (no classifier by default).
    "dinov2_reg4-98": Case(
        "vit_small_patch14_reg4_dinov2",
        "blocks.1.norm1",
        "tokens",
        (7, 7),
        (98, 98),
        5,
        {"depth": 2, "img_size": 98},
        num_classes=10,
    ),
    "dinov2_reg4-98x126": Case(
        "vit_small_patch14_reg4_dinov2",
        "blocks.1.norm1",
        "tokens",
        (7, 9),
        (98, 126),
        5,
        {"depth": 2, "img_size": (98, 126)},
        num_classes=10,
    ),
    # Swin: channels-last stages, permuted rather than reshaped.
    "swin_tiny": Case(
        "swin_tiny_patch4_window7_224",
        "layers.3",
        "channels_last",
        (7, 7),
        (224, 224),
        kwargs={"depths": (1, 1, 1, 1)},
    ),
    "swin_tiny-192x256": Case(
        "swin_tiny_patch4_window7_224",
        "layers.3",
        "channels_last",
        (6, 8),
        (192, 256),
        kwargs={"depths": (1, 1, 1, 1), "img_size": (192, 256), "window_size": (6, 8)},
    ),
}


def _load(load_tiny: Loader, case: Case) -> LoadedModel:
    return load_tiny(
        case.arch,
        num_classes=case.num_classes,
        preprocessing=case.preprocessing,
        **case.kwargs,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_default_layer_layout_and_grid(load_tiny: Loader, name: str) -> None:
    case = CASES[name]
    model = _load(load_tiny, case)
    assert model.input_size == case.input_size
    assert model.default_layer == case.default_layer
    info = model.layer()
    assert info.name == case.default_layer
    assert info.layout == case.layout
    assert info.grid == case.grid
    assert info.prefix_tokens == case.prefix_tokens
    if case.layout == "tokens":
        assert case.prefix_tokens == model.module.num_prefix_tokens
        assert info.output_shape[0] == case.prefix_tokens + case.grid[0] * case.grid[1]


@pytest.mark.parametrize("name", list(CASES))
def test_default_layer_explains_to_a_finite_non_empty_map(load_tiny: Loader, name: str) -> None:
    """Every architecture explains at its default layer with a map that is not all zeros."""
    case = CASES[name]
    model = _load(load_tiny, case)
    x = torch.randn(2, 3, *model.input_size, generator=torch.Generator().manual_seed(3))
    result = explain(model, x, [ImageRequest(layers=(), targets=(1,)), ImageRequest(layers=())])
    for maps in result.maps:
        (cam,) = maps
        assert cam.layer == case.default_layer
        assert cam.grid.shape == case.grid
        assert cam.input_map.shape == case.input_size
        assert np.isfinite(cam.grid).all()
        assert np.isfinite(cam.input_map).all()
        assert 0.0 <= cam.input_map.min() <= cam.input_map.max() <= 1.0
        assert cam.input_map.max() > 0.99


def test_token_grid_drops_the_prefix_tokens_and_keeps_the_patch_order() -> None:
    """(B, N, C) -> (B, C, H, W): token ``prefix + r * W + c`` lands at row r, column c."""
    info = LayerInfo(
        name="blocks.0",
        module_type="Block",
        output_shape=(2 + 6, 3),
        layout="tokens",
        grid=(2, 3),
        channels=3,
        prefix_tokens=2,
    )
    tokens = torch.arange(8, dtype=torch.float32).view(1, 8, 1).repeat(1, 1, 3)
    tokens[:, :, 1] += 100
    grid = info.to_grid(tokens)
    assert grid.shape == (1, 3, 2, 3)
    torch.testing.assert_close(grid[0, 0], torch.tensor([[2.0, 3, 4], [5, 6, 7]]))
    torch.testing.assert_close(grid[0, 1], grid[0, 0] + 100)


def test_channels_last_grid_is_a_permutation_not_a_reshape() -> None:
    info = LayerInfo(
        name="layers.3",
        module_type="SwinTransformerStage",
        output_shape=(2, 3, 4),
        layout="channels_last",
        grid=(2, 3),
        channels=4,
    )
    x = torch.randn(2, 2, 3, 4)
    torch.testing.assert_close(info.to_grid(x), x.permute(0, 3, 1, 2))


def test_resnet_layer_listing_has_shapes_layouts_and_indices(load_tiny: Loader) -> None:
    model = load_tiny("resnet18")
    layers = {layer.name: layer for layer in model.layers}
    expected = {
        "conv1": ((64, 112, 112), 9),
        "maxpool": ((64, 56, 56), 6),
        "layer1": ((64, 56, 56), 5),
        "layer2": ((128, 28, 28), 4),
        "layer3": ((256, 14, 14), 3),
        "layer4": ((512, 7, 7), 2),
        "layer4.1": ((512, 7, 7), None),
        "layer4.1.conv2": ((512, 7, 7), None),
    }
    for name, (shape, index) in expected.items():
        info = layers[name]
        assert info.output_shape == shape
        assert info.layout == "channels_first"
        assert info.channels == shape[0]
        assert info.grid == shape[1:]
        assert info.layer_index == index
    # Non-spatial outputs are not offered.
    assert "global_pool" not in layers
    assert "fc" not in layers
    # Listed in forward order.
    names = [layer.name for layer in model.layers]
    assert names.index("layer1") < names.index("layer2") < names.index("layer4")


def test_vit_layer_listing_has_token_layouts_and_no_indices_inside_blocks(
    load_tiny: Loader,
) -> None:
    model = load_tiny("vit_tiny_patch16_224")
    layers = {layer.name: layer for layer in model.layers}
    norm1 = layers["blocks.11.norm1"]
    assert norm1.output_shape == (197, 192)
    assert norm1.layout == "tokens"
    assert norm1.grid == (14, 14)
    assert norm1.prefix_tokens == 1
    assert norm1.channels == 192
    assert norm1.layer_index is None
    for name in ("blocks.0", "blocks.11", "blocks.11.mlp"):
        assert layers[name].layout == "tokens"
    assert layers["blocks.11.attn.qkv"].channels == 3 * 192
    # The patch embedding's output has no class token yet: nothing to drop.
    assert layers["patch_embed"].output_shape == (196, 192)
    assert layers["patch_embed"].prefix_tokens == 0
    assert layers["patch_embed.proj"].layout == "channels_first"
    assert "head" not in layers
    assert all(layer.grid == (14, 14) for layer in model.layers)


def test_swin_layer_listing_is_channels_last(load_tiny: Loader) -> None:
    model = load_tiny("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1))
    layers = {layer.name: layer for layer in model.layers}
    expected = {
        "layers.0": ((56, 56, 96), (56, 56)),
        "layers.1": ((28, 28, 192), (28, 28)),
        "layers.2": ((14, 14, 384), (14, 14)),
        "layers.3": ((7, 7, 768), (7, 7)),
    }
    for name, (shape, grid) in expected.items():
        assert layers[name].output_shape == shape
        assert layers[name].layout == "channels_last"
        assert layers[name].grid == grid
        assert layers[name].channels == shape[-1]


def test_stages_are_timms_feature_stages(load_tiny: Loader) -> None:
    resnet = load_tiny("resnet18")
    assert [layer.name for layer in resnet.layers if layer.stage] == [
        "act1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    swin = load_tiny("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1))
    assert [layer.name for layer in swin.layers if layer.stage] == [
        "layers.0",
        "layers.1",
        "layers.2",
        "layers.3",
    ]


def test_without_feature_stages_the_top_level_children_with_a_map_are_the_stages() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.ReLU()),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 2),
    )
    layers = discover_layers(model, (16, 16), torch.device("cpu"))
    assert [layer.name for layer in layers if layer.stage] == ["0", "1"]
    assert {layer.name for layer in layers} == {"0", "1", "1.0", "1.1"}
