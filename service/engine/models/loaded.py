"""A served model resident on its device: its layers, classes and preprocessing, and how
callers' layer and class names resolve against them. Building one is
:func:`service.engine.loading.load_model`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from service.engine.models.layers import LayerInfo
from service.engine.models.preprocess import PreprocessConfig
from service.engine.models.spec import Activation, ModelSpec
from service.errors import UnknownLayerError, UnknownTargetError

WeightsSource = Literal["hub", "safetensors", "state_dict", "random"]


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from; ``random`` is reported loudly everywhere."""

    source: WeightsSource
    location: str | None = None
    note: str | None = None

    @property
    def random(self) -> bool:
        return self.source == "random"

    def random_warning(self, model: str, what: str) -> str | None:
        """The one sentence every caller shows for random weights (``what``: what is
        meaningless for that caller), with the reason they are random; None for real weights."""
        if not self.random:
            return None
        sentence = f"Model '{model}' runs with RANDOM weights: its {what} are meaningless."
        if self.note and self.note != "requested":
            sentence += f" {self.note[0].upper()}{self.note[1:]}."
        return sentence


@dataclass
class LoadedModel:
    """A model resident on its device, ready to predict and explain."""

    spec: ModelSpec
    module: nn.Module
    device: torch.device
    preprocessing: PreprocessConfig
    labels: list[str]
    weights: WeightsInfo
    layers: list[LayerInfo]
    default_layer: str
    autocast_dtype: torch.dtype | None = None
    _by_name: dict[str, LayerInfo] = field(default_factory=dict, repr=False)
    _by_index: dict[int, LayerInfo] = field(default_factory=dict, repr=False)
    _label_levels: list[dict[str, list[int]]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}
        self._by_index = {
            layer.layer_index: layer for layer in self.layers if layer.layer_index is not None
        }
        # A class is named by its full label or by any of its comma-separated synonyms
        # (ImageNet's "tabby, tabby cat": "tabby" or "tabby cat"); full labels before synonyms,
        # exact matches before case-insensitive ones.
        levels: list[dict[str, set[int]]] = [{}, {}, {}, {}]
        for i, label in enumerate(self.labels):
            synonyms = {part.strip() for part in label.split(",") if part.strip()} - {label}
            levels[0].setdefault(label, set()).add(i)
            levels[2].setdefault(label.casefold(), set()).add(i)
            for synonym in synonyms:
                levels[1].setdefault(synonym, set()).add(i)
                levels[3].setdefault(synonym.casefold(), set()).add(i)
        self._label_levels = [
            {key: sorted(hits) for key, hits in level.items()} for level in levels
        ]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessing.input_size

    @property
    def activation(self) -> Activation:
        return self.spec.activation

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits -> float32 probabilities, as the model's ``activation`` says:
        softmax over the classes, or one sigmoid per class for multi-label models.

        The one place the activation is applied; maps never depend on it (they follow the
        logit)."""
        logits = logits.float()
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def autocast(self) -> AbstractContextManager[object]:
        """Mixed precision when configured (meant for CUDA; CPU autocast works, slowly)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def label_names(self) -> list[str]:
        """The names offered to callers (the served OpenAPI enum): full labels and their first
        synonyms, less those that name several classes (ImageNet's two "crane"s). Every other
        synonym is accepted too (:meth:`label_target`)."""
        names = dict.fromkeys(n for label in self.labels for n in (label, label.split(",")[0]))
        return [name for name in names if len(self._label_hits(name.strip())) == 1]

    def layer_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """The layers to explain: ``names``, or the model's default layer when there are none.

        The one place the default layer is applied."""
        return tuple(names) or (self.default_layer,)

    def layer_at(self, index: int) -> LayerInfo:
        """Resolve the seed script's ``layer_index`` (top-level children counted back from the
        classifier)."""
        if index in self._by_index:
            return self._by_index[index]
        allowed = sorted(self._by_index)
        raise UnknownLayerError(
            f"layer_index {index} does not select a spatial layer of model '{self.name}'. "
            f"Allowed: {', '.join(map(str, allowed))}.",
            allowed=[str(i) for i in allowed],
        )

    def layer(self, name: str | None = None) -> LayerInfo:
        """Resolve a layer by module path; none: the default layer."""
        if name is None:
            return self._by_name[self.default_layer]
        if name in self._by_name:
            return self._by_name[name]
        raise UnknownLayerError(
            f"Model '{self.name}' has no usable layer '{name}'."
            + _did_you_mean(name, self._by_name),
            allowed=_close(name, self._by_name) or None,
        )

    def target(self, value: int | str) -> int:
        """Resolve a class index (an int, or a string of digits) or a label name to an index,
        or raise UnknownTargetError."""
        if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
            index = int(value)
            if 0 <= index < self.num_classes:
                return index
            raise UnknownTargetError(
                f"Class index {index} is outside the {self.num_classes} classes of model"
                f" '{self.name}' (0 to {self.num_classes - 1})."
            )
        return self.label_target(value)

    def _label_hits(self, value: str) -> list[int]:
        """The classes ``value`` names at the first level that knows it."""
        folded = value.casefold()
        keys = (value, value, folded, folded)
        for level, key in zip(self._label_levels, keys, strict=True):
            if key in level:
                return level[key]
        return []

    def label_target(self, value: str) -> int:
        """Resolve a label (the whole label or one of its comma-separated synonyms; exact, else
        case-insensitive) to its class index, or raise UnknownTargetError; a string of digits is
        a label here, not an index."""
        hits = self._label_hits(value)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            # Never guess: ImageNet has two classes called "crane" (the bird and the machine).
            raise UnknownTargetError(
                f"The label '{value}' names several classes of model '{self.name}': "
                + ", ".join(f"{i} ({self.labels[i]})" for i in hits)
                + ". Use the class index.",
                code="ambiguous_target",
                allowed=[str(i) for i in hits],
            )
        if self.num_classes <= 50:
            raise UnknownTargetError(
                f"Model '{self.name}' has no class labelled '{value}'."
                f" Allowed: {', '.join(self.labels)}.",
                allowed=self.labels,
            )
        names = {**self._label_levels[3], **self._label_levels[2]}
        raise UnknownTargetError(
            f"Model '{self.name}' has no class labelled '{value}'."
            + _did_you_mean(value.casefold(), names),
            allowed=_close(value.casefold(), names) or None,
        )


def _close(name: str, known: Iterable[str]) -> list[str]:
    """Up to 3 known names closest to ``name`` (difflib's ratio, at least 0.6)."""
    return difflib.get_close_matches(name, list(known), n=3)


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = _close(name, known)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
