"""What a served model is: the typed description a models file or the settings provide."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CropMode = Literal["center", "squash", "border"]
Interpolation = Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"]
#: How logits become the probabilities a model reports: one distribution over the classes
#: (softmax), or an independent probability per class for multi-label models (sigmoid).
Activation = Literal["softmax", "sigmoid"]
#: Per-channel normalisation values: three for RGB models, one for grey (in_chans 1) models.
ChannelValues = tuple[float] | tuple[float, float, float]


class PreprocessOverrides(BaseModel):
    """Per-model overrides of the preprocessing that timm's data config gives."""

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[int, int] | None = Field(
        default=None, description="(height, width) fed to the network."
    )
    interpolation: Interpolation | None = None
    crop_pct: float | None = Field(default=None, gt=0.0, le=1.0)
    crop_mode: CropMode | None = None
    mean: ChannelValues | None = Field(
        default=None, description="One value per input channel: 3 (RGB) or 1 (in_chans 1)."
    )
    std: ChannelValues | None = Field(
        default=None, description="One value per input channel: 3 (RGB) or 1 (in_chans 1)."
    )

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _single_number(cls, value: object) -> object:
        """A grey model's value may be written as a plain number (``mean: 0.5``)."""
        return (value,) if isinstance(value, int | float) and not isinstance(value, bool) else value


class ModelSpec(BaseModel):
    """One model to serve.

    ``weights`` is ``"hub"`` (timm's pretrained weights from the hub or a warm cache),
    ``"random"`` (random initialisation, only when asked for, and reported as such), or a path
    to a local ``.safetensors`` file or a state dict (``.pt``/``.pth``/``.bin``, loaded with
    ``weights_only=True``).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Name in the API.")
    architecture: str = Field(description="timm architecture name, e.g. resnet50.")
    num_classes: int | None = Field(default=None, ge=1)
    weights: str = "hub"
    fallback_to_random: bool = Field(
        default=False,
        description="If hub weights cannot be fetched, start with random weights (labelled).",
    )
    labels: list[str] | None = None
    labels_file: Path | None = None
    default_layer: str | None = None
    preprocessing: PreprocessOverrides = Field(default_factory=PreprocessOverrides)
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model (in_chans: 1 for grey input).",
    )
    activation: Activation = Field(
        default="softmax",
        description="softmax: one distribution over the classes; sigmoid: an independent"
        " probability per class (multi-label models, e.g. chest X-ray findings).",
    )

    @field_validator("weights")
    @classmethod
    def _weights_form(cls, value: str) -> str:
        if value in ("hub", "random"):
            return value
        suffix = Path(value).suffix.lower()
        if suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise ValueError(
                "weights must be 'hub', 'random' or a path ending in .safetensors, .pt, .pth"
                " or .bin"
            )
        return value

    @model_validator(mode="after")
    def _one_label_source(self) -> ModelSpec:
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give labels or labels_file, not both")
        return self


def check_unique_names(specs: Sequence[ModelSpec]) -> None:
    """Model names are the API's keys: refuse (``ValueError``) a list that repeats one."""
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}.")
