"""Capturing layer outputs for one call, on a model other threads may be using at the same time.

Why forward hooks on the module outputs and tensor-level gradients rather than module backward
hooks: backward hooks misbehave with in-place ops (pytorch issue 61519) and would make autograd
run the whole backward pass. Instead, when gradients are wanted, the captured output becomes a
fresh leaf that requires grad (parameters are frozen and the input needs no grad, so nothing
upstream is recorded) and the rest of the network receives a clone of it: the clone keeps
in-place ops downstream (timm's ``ReLU(inplace=True)``, ``x += shortcut``) off the captured
tensor, and ``torch.autograd.grad(logit, leaf)`` stops the backward pass at the layer.

If an earlier captured layer already requires grad, a later one stays in the graph (it is not
detached, or the earlier layer would get no gradient) and is captured as a non-leaf.

Hooks belong to the call: they are registered on entry and removed in ``finally``, and each hook
acts only for the call that registered it (a ContextVar identifies it), so a forward pass running
concurrently in another thread on the same model passes through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from service.errors import UnknownLayerError

_ACTIVE: ContextVar[object | None] = ContextVar("gradcam_active_capture", default=None)


class LayerCapture:
    """Context manager that records the outputs of named modules during one forward pass."""

    def __init__(self, model: nn.Module, layer_names: Sequence[str], *, with_grad: bool) -> None:
        self._model = model
        self._names = list(dict.fromkeys(layer_names))
        self._with_grad = with_grad
        self._handles: list[RemovableHandle] = []
        self._token = object()
        self._reset: object | None = None
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> LayerCapture:
        modules = dict(self._model.named_modules())
        missing = [name for name in self._names if name not in modules]
        if missing:
            raise UnknownLayerError(f"The model has no layer named '{missing[0]}'.")
        self._reset = _ACTIVE.set(self._token)
        try:
            for name in self._names:
                self._handles.append(modules[name].register_forward_hook(self._hook_for(name)))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._reset is not None:
            _ACTIVE.reset(self._reset)  # type: ignore[arg-type]
            self._reset = None

    def _hook_for(self, name: str) -> object:
        def hook(_module: nn.Module, _args: object, output: object) -> object:
            if _ACTIVE.get() is not self._token:
                return None  # another call's forward on the shared model
            if not isinstance(output, torch.Tensor):
                raise UnknownLayerError(
                    f"Layer '{name}' does not output a single tensor; choose another layer."
                )
            if name in self.outputs:
                raise UnknownLayerError(
                    f"Layer '{name}' runs more than once per forward pass; choose another layer."
                )
            if not self._with_grad:
                captured = output.detach().clone()
                self.outputs[name] = captured
                return None
            # If an earlier captured layer is upstream, stay in its graph; else start a leaf.
            captured = output if output.requires_grad else output.detach().requires_grad_(True)
            self.outputs[name] = captured
            return captured.clone()

        return hook

    def active_hooks(self) -> int:
        """Number of hooks this capture still holds (0 after exit)."""
        return len(self._handles)
