"""The CAM method family, by name.

Every method turns a layer's activations ``A`` (B, C, H, W) into one unrectified (B, H, W) map
per image. Two small bases, so that a new method is one override:

- :class:`GradientMethod`: methods that also use ``G = dy_c/dA``, the gradient of the explained
  class's logit. Most only say how to weigh channels (:meth:`GradientMethod.weights`) and the
  base forms ``sum_k w_k A_k``; element-wise ones override :meth:`GradientMethod.cam`.
- :class:`GradientFreeMethod`: methods that never back-propagate (:meth:`GradientFreeMethod.cam`);
  the few that run the model on perturbed inputs say so with ``needs_model`` and get a
  :class:`PerturbationContext`.

ReLU/threshold, normalisation and resizing are common to all and happen in
:mod:`service.engine.cam.explain`. Formulas and epsilons follow the reference library
(pytorch-grad-cam) so that maps agree with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from service.engine.cam.costs import Cost
from service.engine.models.layers import LayerInfo
from service.errors import InvalidParameterError


@dataclass
class PerturbationContext:
    """What a method that runs the model on perturbed inputs (Score-CAM) needs besides the
    activations: the inputs, a way to run the model, and the batch to run perturbed inputs in."""

    inputs: torch.Tensor  # (B, 3, H, W) model inputs, one row per CAM row
    targets: torch.Tensor  # (B,) class index per row
    run_model: Callable[[torch.Tensor], torch.Tensor]  # masked inputs -> logits, no grad
    batch_size: int
    # (image, layer) per row: the masked forward passes of one image at one layer serve every
    # target class of that image, so their logits are kept for the call's later rounds.
    keys: list[tuple[int, str]] = field(default_factory=list)
    cache: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


class CamMethod(ABC):
    """A CAM method: its API name, what it needs, and how it forms the map."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_gradients: ClassVar[bool]
    needs_model: ClassVar[bool] = False

    @property
    def too_costly_code(self) -> str:
        """The error code of a request refused for this method's cost."""
        return f"{self.name}_too_costly"

    def cost(self, layers: Sequence[LayerInfo], targets: int) -> Cost:
        """What explaining one image at ``layers`` for ``targets`` classes costs beyond its
        forward pass: a gradient round per class for gradient methods, nothing else. A method
        that runs the model on perturbed inputs overrides this with its passes."""
        return Cost(backward_passes=targets if self.needs_gradients else 0)

    @abstractmethod
    def combine(
        self,
        activations: torch.Tensor,
        gradients: torch.Tensor | None,
        perturbed: PerturbationContext | None = None,
    ) -> torch.Tensor:
        """The unrectified map (B, H, W)."""


class GradientMethod(CamMethod):
    """A method that uses the gradients: override :meth:`weights` or :meth:`cam`."""

    needs_gradients = True

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Channel weights ``w`` (B, C)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither weights nor cam")

    def cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """The map (B, H, W): ``sum_k w_k A_k`` unless overridden."""
        return torch.einsum("bc,bchw->bhw", self.weights(activations, gradients), activations)

    def combine(
        self,
        activations: torch.Tensor,
        gradients: torch.Tensor | None,
        perturbed: PerturbationContext | None = None,
    ) -> torch.Tensor:
        if gradients is None:
            raise ValueError(f"{self.name} needs the gradients of the explained class")
        return self.cam(activations, gradients)


class GradientFreeMethod(CamMethod):
    """A method that never back-propagates: override :meth:`cam`."""

    needs_gradients = False

    @abstractmethod
    def cam(self, activations: torch.Tensor, perturbed: PerturbationContext | None) -> torch.Tensor:
        """The map (B, H, W); ``perturbed`` is given when ``needs_model`` is set."""

    def combine(
        self,
        activations: torch.Tensor,
        gradients: torch.Tensor | None,
        perturbed: PerturbationContext | None = None,
    ) -> torch.Tensor:
        return self.cam(activations, perturbed)


class GradCAM(GradientMethod):
    """Grad-CAM, Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391.

    ``w_k = mean_u G_k(u)``: the spatially averaged gradient of each channel.
    """

    name = "gradcam"
    description = "Grad-CAM: channel weights are the spatially averaged gradients (paper default)."

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(2, 3))


class GradCAMPlusPlus(GradientMethod):
    """Grad-CAM++, Chattopadhyay et al. 2018, https://arxiv.org/abs/1710.11063.

    ``w_k = sum_u a_k(u) ReLU(G_k(u))`` with
    ``a_k(u) = G_k(u)^2 / (2 G_k(u)^2 + sum_v A_k(v) G_k(u)^3)`` (the exponential-output
    closed form; ``a = 0`` where the gradient is 0).
    """

    name = "gradcam++"
    description = (
        "Grad-CAM++: pixel-wise weighting of positive gradients; better for several objects."
    )

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        grads_2 = gradients.pow(2)
        grads_3 = grads_2 * gradients
        sum_activations = activations.sum(dim=(2, 3), keepdim=True)
        aij = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 1e-6)
        aij = torch.where(gradients != 0, aij, torch.zeros_like(aij))
        return (gradients.clamp(min=0) * aij).sum(dim=(2, 3))


class XGradCAM(GradientMethod):
    """XGrad-CAM, Fu et al. 2020, https://arxiv.org/abs/2008.02312.

    ``w_k = sum_u G_k(u) A_k(u) / sum_v A_k(v)``: gradients weighted by each position's share
    of its channel's activation.
    """

    name = "xgradcam"
    description = "XGrad-CAM: gradients weighted by the activations' share of their channel sum."

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        sum_activations = activations.sum(dim=(2, 3), keepdim=True)
        return (gradients * activations / (sum_activations + 1e-7)).sum(dim=(2, 3))


class HiResCAM(GradientMethod):
    """HiResCAM, Draelos & Carin 2020, https://arxiv.org/abs/2011.08891.

    ``M(u) = sum_k G_k(u) A_k(u)``: element-wise, no spatial pooling of the gradients.
    """

    name = "hirescam"
    description = "HiResCAM: element-wise gradient times activation, no spatial pooling."

    def cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients * activations).sum(dim=1)


class LayerCAM(GradientMethod):
    """LayerCAM, Jiang et al. 2021, https://doi.org/10.1109/TIP.2021.3089943.

    ``M(u) = sum_k ReLU(G_k(u)) A_k(u)``; works well at shallow layers.
    """

    name = "layercam"
    description = "LayerCAM: positive gradients times activations; sharp maps at early layers."

    def cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients.clamp(min=0) * activations).sum(dim=1)


class EigenCAM(GradientFreeMethod):
    """Eigen-CAM, Muhammad & Yeasin 2020, https://arxiv.org/abs/2008.00299.

    ``M = A~ v_1``: the projection of the mean-centred activations ``A~`` (positions x channels)
    on their first right singular vector. Class-agnostic. The SVD's sign is arbitrary; it is
    fixed so that the component agrees with the mean activation, which keeps the map's hot side
    the active one.
    """

    name = "eigencam"
    description = (
        "Eigen-CAM: first principal component of the activations (no gradients, class-agnostic)."
    )

    def cam(self, activations: torch.Tensor, perturbed: PerturbationContext | None) -> torch.Tensor:
        batch, channels, height, width = activations.shape
        flat = activations.reshape(batch, channels, height * width).transpose(1, 2)
        flat = torch.nan_to_num(flat.double())
        centred = flat - flat.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = torch.einsum("bnc,bc->bn", centred, vh[:, 0, :])
        mean_map = flat.mean(dim=2)
        sign = torch.sign((projection * (mean_map - mean_map.mean(dim=1, keepdim=True))).sum(1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (projection * sign[:, None]).float().reshape(batch, height, width)


class ScoreCAM(GradientFreeMethod):
    """Score-CAM, Wang et al. 2020, https://arxiv.org/abs/1910.01279.

    ``w = softmax_k(y_c(x * norm(up(A_k))))``: each channel, upsampled to the input and min-max
    normalised, masks the input; the masked input's target logit, softmaxed over channels, is
    that channel's weight. Costs one forward pass per channel per image and layer, whatever the
    number of targets (:meth:`cost`); the engine caps it
    (:func:`~service.engine.cam.costs.check_cost`).
    """

    name = "scorecam"
    description = (
        "Score-CAM: channel weights from forward passes on activation-masked inputs (slow)."
    )
    needs_model = True

    def cost(self, layers: Sequence[LayerInfo], targets: int) -> Cost:
        return Cost(forward_passes=sum(layer.channels for layer in layers))

    def cam(self, activations: torch.Tensor, perturbed: PerturbationContext | None) -> torch.Tensor:
        if perturbed is None:
            raise ValueError("scorecam needs the inputs and the model (a PerturbationContext)")
        rows = []
        for row in range(activations.shape[0]):
            key = perturbed.keys[row] if perturbed.keys else None
            logits = perturbed.cache.get(key) if key is not None else None
            if logits is None:
                logits = self._masked_logits(activations[row], perturbed.inputs[row], perturbed)
                if key is not None:
                    perturbed.cache[key] = logits
            weights = torch.softmax(logits[:, int(perturbed.targets[row])], dim=0)
            rows.append(torch.einsum("c,chw->hw", weights, activations[row]))
        return torch.stack(rows)

    @staticmethod
    def _masked_logits(
        activations: torch.Tensor, image: torch.Tensor, perturbed: PerturbationContext
    ) -> torch.Tensor:
        """Logits (C, classes) of the image masked by each upsampled, normalised channel."""
        # align_corners=True matches the reference library's UpsamplingBilinear2d.
        upsampled = F.interpolate(
            activations[None], size=image.shape[-2:], mode="bilinear", align_corners=True
        )[0]
        flat = upsampled.reshape(upsampled.shape[0], -1)
        mins = flat.min(dim=1).values[:, None, None]
        maxs = flat.max(dim=1).values[:, None, None]
        masks = (upsampled - mins) / (maxs - mins + 1e-8)
        chunks = [
            perturbed.run_model(
                image[None] * masks[start : start + perturbed.batch_size, None]
            ).float()
            for start in range(0, masks.shape[0], perturbed.batch_size)
        ]
        return torch.cat(chunks)


METHODS: dict[str, CamMethod] = {
    method.name: method
    for method in (
        GradCAM(),
        GradCAMPlusPlus(),
        XGradCAM(),
        HiResCAM(),
        LayerCAM(),
        EigenCAM(),
        ScoreCAM(),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> CamMethod:
    """Look a method up by its API name."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidParameterError(
            f"Unknown method '{name}'. Use one of: {', '.join(METHOD_NAMES)}.",
            code="unknown_method",
            allowed=METHOD_NAMES,
        ) from None
