"""Our CAM maps against the reference library (pytorch-grad-cam) on the same models and inputs.

The reference runs on our loaded model (eval mode, frozen parameters); it needs a gradient path,
so its input requires grad. Maps are compared at the model's input size after the reference's
own normalisation (``CamMap.input_map``), as the maximum absolute difference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from service.engine.cam.explain import ImageRequest, explain
from service.engine.models.loaded import LoadedModel

TOLERANCE = 1e-5
# Explicit targets, a different one per image, none of them the argmax of a random model.
TARGETS = (3, 141, 977)

REFERENCE: dict[str, type[pgc.base_cam.BaseCAM]] = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "scorecam": pgc.ScoreCAM,
}

# (arch, timm kwargs, layer); full-size resnet18, vit_tiny and swin_tiny.
GRADCAM_CASES = [
    pytest.param("resnet18", {}, "layer4", id="resnet18-layer4"),
    pytest.param("resnet18", {}, "layer3", id="resnet18-layer3"),
    pytest.param("vit_tiny_patch16_224", {}, "blocks.11.norm1", id="vit_tiny-blocks.11.norm1"),
    pytest.param("swin_tiny_patch4_window7_224", {}, "layers.3", id="swin_tiny-layers.3"),
]


def _inputs(model: LoadedModel, batch: int = 3, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.input_size, generator=generator)


def _ours(
    model: LoadedModel,
    x: torch.Tensor,
    layer: str,
    method: str,
    targets: tuple[int, ...] | None,
) -> np.ndarray:
    if targets is None:
        requests = [ImageRequest(layers=(layer,)) for _ in range(x.shape[0])]
    else:
        requests = [ImageRequest(layers=(layer,), targets=(t,)) for t in targets]
    result = explain(model, x, requests, method=method)
    assert all(len(maps) == 1 for maps in result.maps)
    return np.stack([maps[0].input_map for maps in result.maps])


def _reference(
    model: LoadedModel,
    x: torch.Tensor,
    layer: str,
    cam_class: Callable[..., pgc.base_cam.BaseCAM],
    targets: tuple[int, ...] | None,
) -> np.ndarray:
    info = model.layer(layer)
    module = dict(model.module.named_modules())[layer]
    reshape = None if info.layout == "channels_first" else info.to_grid
    with cam_class(model.module, [module], reshape_transform=reshape) as cam:
        wanted = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
        return np.asarray(cam(input_tensor=x.clone().requires_grad_(True), targets=wanted))


def _assert_meaningful(reference: np.ndarray) -> None:
    """Guard against a vacuous comparison: every reference map must span [0, 1]."""
    assert reference.shape[0] == 3
    for image_map in reference:
        assert image_map.max() > 0.99
        assert image_map.min() < 0.01


@pytest.mark.parametrize(("arch", "kwargs", "layer"), GRADCAM_CASES)
def test_gradcam_matches_reference_with_a_different_target_per_image(
    load_tiny: Callable[..., LoadedModel], arch: str, kwargs: dict[str, object], layer: str
) -> None:
    model = load_tiny(arch, **kwargs)
    x = _inputs(model)
    ours = _ours(model, x, layer, "gradcam", TARGETS)
    reference = _reference(model, x, layer, pgc.GradCAM, TARGETS)
    _assert_meaningful(reference)
    assert ours.shape == reference.shape == (3, *model.input_size)
    assert np.abs(ours - reference).max() <= TOLERANCE


@pytest.mark.parametrize(("arch", "kwargs", "layer"), GRADCAM_CASES)
def test_gradcam_default_target_is_the_argmax_like_the_reference(
    load_tiny: Callable[..., LoadedModel], arch: str, kwargs: dict[str, object], layer: str
) -> None:
    model = load_tiny(arch, **kwargs)
    x = _inputs(model, seed=8)
    result = explain(model, x, [ImageRequest(layers=(layer,)) for _ in range(3)])
    chosen = [maps[0].target for maps in result.maps]
    assert chosen == result.probabilities.argmax(axis=1).tolist()
    ours = np.stack([maps[0].input_map for maps in result.maps])
    reference = _reference(model, x, layer, pgc.GradCAM, None)
    _assert_meaningful(reference)
    assert np.abs(ours - reference).max() <= TOLERANCE


METHOD_CASES = [
    pytest.param(method, arch, layer, tolerance, id=f"{method}-{arch}")
    for method in ("gradcam++", "xgradcam", "hirescam", "layercam")
    for arch, layer, tolerance in (
        ("resnet18", "layer4", TOLERANCE),
        # XGrad-CAM divides by each channel's activation sum; after a LayerNorm some sums are
        # near zero (0.03 against a median of 16 here), which amplifies float32 rounding: both
        # implementations are then about 2e-4 from a float64 computation, so 1e-5 between them
        # would only measure summation order. The formula is checked at 1e-5 on the CNN.
        (
            "vit_tiny_patch16_224",
            "blocks.11.norm1",
            1e-3 if method == "xgradcam" else TOLERANCE,
        ),
    )
]


@pytest.mark.parametrize(("method", "arch", "layer", "tolerance"), METHOD_CASES)
def test_gradient_methods_match_reference(
    load_tiny: Callable[..., LoadedModel], method: str, arch: str, layer: str, tolerance: float
) -> None:
    model = load_tiny(arch)
    x = _inputs(model)
    ours = _ours(model, x, layer, method, TARGETS)
    reference = _reference(model, x, layer, REFERENCE[method], TARGETS)
    _assert_meaningful(reference)
    assert np.abs(ours - reference).max() <= tolerance


class _FlippedEigenCAM(pgc.EigenCAM):  # type: ignore[misc]
    """The reference Eigen-CAM with the principal component's sign flipped."""

    def get_cam_image(self, *args: object, **kwargs: object) -> np.ndarray:
        activations = args[3]
        assert isinstance(activations, np.ndarray)
        return -get_2d_projection(activations)


@pytest.mark.parametrize(
    ("arch", "layer"),
    [("resnet18", "layer4"), ("vit_tiny_patch16_224", "blocks.11.norm1")],
)
def test_eigencam_matches_reference_up_to_the_sign_of_the_component(
    load_tiny: Callable[..., LoadedModel], arch: str, layer: str
) -> None:
    """An SVD's sign is arbitrary: the reference keeps whatever NumPy returns, we fix it to agree
    with the mean activation. Per image, ours equals the reference map for one of the signs."""
    model = load_tiny(arch)
    x = _inputs(model)
    ours = _ours(model, x, layer, "eigencam", TARGETS)
    as_is = _reference(model, x, layer, pgc.EigenCAM, TARGETS)
    flipped = _reference(model, x, layer, _FlippedEigenCAM, TARGETS)
    for image in range(3):
        # The two signs give genuinely different maps, so matching one of them means something.
        assert np.abs(as_is[image] - flipped[image]).max() > 0.5
        best = min(
            np.abs(ours[image] - as_is[image]).max(), np.abs(ours[image] - flipped[image]).max()
        )
        assert best <= TOLERANCE


def test_scorecam_matches_reference_on_a_narrow_resnet(
    load_tiny: Callable[..., LoadedModel],
) -> None:
    """Score-CAM costs one forward pass per channel: a 32-channel layer at 96x96 keeps it quick."""
    model = load_tiny(
        "resnet18",
        channels=(8, 16, 32, 32),
        stem_width=8,
        preprocessing={"input_size": (96, 96), "crop_pct": 1.0},
    )
    layer = "layer3"
    assert model.layer(layer).channels == 32
    x = _inputs(model)
    ours = _ours(model, x, layer, "scorecam", TARGETS)
    reference = _reference(model, x, layer, pgc.ScoreCAM, TARGETS)
    _assert_meaningful(reference)
    assert np.abs(ours - reference).max() <= TOLERANCE
