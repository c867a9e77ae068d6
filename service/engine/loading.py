"""Building a served model: architecture, weights, labels, preprocessing, layers, warm-up."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from service.engine.cam.explain import ImageRequest, explain
from service.engine.hub import cache_only, hub_access
from service.engine.models.layers import default_layer_name, discover_layers
from service.engine.models.loaded import LoadedModel, WeightsInfo, WeightsSource
from service.engine.models.preprocess import SUPPORTED_CHANNELS, PreprocessConfig
from service.engine.models.spec import ModelSpec
from service.errors import ModelLoadError

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"Device '{requested}' was requested but CUDA is not available.")
    return device


def _check_in_chans(spec: ModelSpec, in_chans: object) -> int:
    """The model's input channels, or a load error saying which values are supported."""
    if (
        isinstance(in_chans, int)
        and not isinstance(in_chans, bool)
        and in_chans in SUPPORTED_CHANNELS
    ):
        return in_chans
    raise ModelLoadError(
        f"Model '{spec.name}': in_chans={in_chans!r} is not supported. The service feeds RGB"
        " images (in_chans 3, timm's default) or grey ones (model_kwargs: {in_chans: 1})."
    )


def _in_chans(spec: ModelSpec, module: nn.Module) -> int:
    """timm models say how many channels they take (``in_chans``); the kwargs say it otherwise."""
    return _check_in_chans(spec, getattr(module, "in_chans", spec.model_kwargs.get("in_chans", 3)))


def _create(spec: ModelSpec, pretrained: bool) -> nn.Module:
    import timm

    kwargs = dict(spec.model_kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    try:
        return timm.create_model(spec.architecture, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelLoadError(
                f"Model '{spec.name}': timm has no architecture '{spec.architecture}'."
            ) from exc
        raise


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module.") :]: v for k, v in tensors.items()}
            return tensors
    raise ModelLoadError("The checkpoint holds no state dict of tensors.")


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"Weights file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not read {path.name} as a state dict with weights_only=True: {exc}"
        ) from exc
    return _unwrap_state_dict(obj)


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], origin: str
) -> None:
    """Load ``state`` into ``model``, or fail naming the first mismatched keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}")
        if wrong_shape:
            parts.append(f"shape mismatches: {', '.join(wrong_shape[:5])}")
        raise ModelLoadError(
            f"Weights from {origin} do not fit the architecture: " + "; ".join(parts) + "."
        )
    model.load_state_dict(state, strict=True)


def random_seed(name: str) -> int:
    """The seed of a model's random weights: from its name, so that a model without weights
    gives the same answers on every start and every run of a local command."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _create_random(spec: ModelSpec) -> nn.Module:
    """The architecture with random weights drawn under :func:`random_seed` (the global random
    state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_seed(spec.name))
        return _create(spec, pretrained=False)


def _first_sentence(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    end = text.find(". ")
    return (text if end < 0 else text[:end]).rstrip(".")


def _build_from_hub(spec: ModelSpec) -> tuple[nn.Module, WeightsInfo]:
    """timm's pretrained weights: downloaded when the hub answers, else from the local cache
    only (see :mod:`service.engine.hub`); where neither has them, random weights when the
    entry allows it, said in one warning line."""
    access = hub_access()
    try:
        if access.online:
            model = _create(spec, pretrained=True)
        else:
            with cache_only():
                model = _create(spec, pretrained=True)
            logger.info(
                "model %s: hub weights for %s from the local cache (%s)",
                spec.name,
                spec.architecture,
                access.reason,
            )
        return model, WeightsInfo("hub", location=spec.architecture)
    except ModelLoadError:
        raise
    except Exception as exc:
        if access.online:
            why = f"{type(exc).__name__}: {_first_sentence(exc)}"
        else:
            why = f"{access.reason} and they are not in the local cache"
        if not spec.fallback_to_random:
            raise ModelLoadError(
                f"Model '{spec.name}': hub weights for '{spec.architecture}' could not be"
                f" loaded: {why}. Provide a local weights file, or set fallback_to_random to"
                " try the API with random weights."
            ) from exc
        logger.warning(
            "model %s: RANDOM WEIGHTS in use (seeded from the model's name, the same on every"
            " start), predictions and explanations are meaningless. Hub weights for %s"
            " unavailable: %s.",
            spec.name,
            spec.architecture,
            why,
        )
        note = f"fell back to random: hub weights unavailable, {why}"
        return _create_random(spec), WeightsInfo("random", note=note)


def _build(spec: ModelSpec) -> tuple[nn.Module, WeightsInfo]:
    if spec.weights == "random":
        return _create_random(spec), WeightsInfo("random", note="requested")
    if spec.weights == "hub":
        return _build_from_hub(spec)
    path = Path(spec.weights)
    model = _create(spec, pretrained=False)
    state = _read_checkpoint(path)
    load_state_dict_strict(model, state, path.name)
    kind: WeightsSource = "safetensors" if path.suffix.lower() == ".safetensors" else "state_dict"
    return model, WeightsInfo(kind, location=str(path))


def _labels(spec: ModelSpec, num_classes: int) -> list[str]:
    labels: list[str] | None = spec.labels
    if spec.labels_file is not None:
        text = Path(spec.labels_file).read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            labels = [str(v) for v in json.loads(text)]
        else:
            labels = [line.strip() for line in text.splitlines() if line.strip()]
    if labels is None:
        if num_classes == 1000:
            from timm.data.imagenet_info import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i) for i in range(1000)]
        return [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ModelLoadError(
            f"Model '{spec.name}' has {num_classes} classes but {len(labels)} labels were given."
        )
    if len(set(labels)) != len(labels):
        raise ModelLoadError(f"Model '{spec.name}' has duplicate label names.")
    return labels


def _input_size(model: nn.Module, data_config: dict[str, object]) -> dict[str, object]:
    """timm's data config ignores ``img_size`` given at creation; the patch embed knows it."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, tuple) and len(img_size) == 2:
        data_config = dict(data_config)
        data_config["input_size"] = (3, int(img_size[0]), int(img_size[1]))
    return data_config


def load_model(
    spec: ModelSpec,
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    warmup: bool = True,
) -> LoadedModel:
    """Build, load and warm up a model: eval mode, frozen parameters, on ``device``."""
    from timm.data.config import resolve_model_data_config

    _check_in_chans(spec, spec.model_kwargs.get("in_chans", 3))  # before any download
    module, weights = _build(spec)
    module.eval()
    module.requires_grad_(False)
    module.to(device)
    head = getattr(module, "num_classes", None)
    num_classes = int(head) if isinstance(head, int) and head > 0 else spec.num_classes or 0
    if num_classes <= 0:
        raise ModelLoadError(f"Model '{spec.name}' has no classifier head to explain.")
    data_config = _input_size(module, resolve_model_data_config(module))  # type: ignore[no-untyped-call]
    try:
        preprocessing = PreprocessConfig.from_timm(
            data_config, spec.preprocessing, channels=_in_chans(spec, module)
        )
    except ValueError as exc:
        raise ModelLoadError(f"Model '{spec.name}': {exc}") from exc
    layers = discover_layers(module, preprocessing.input_size, device, preprocessing.channels)
    default = spec.default_layer or default_layer_name(module, layers)
    if default is None or default not in {layer.name for layer in layers}:
        raise ModelLoadError(
            f"Model '{spec.name}': default layer '{default}' is not a usable spatial layer."
        )
    loaded = LoadedModel(
        spec=spec,
        module=module,
        device=device,
        preprocessing=preprocessing,
        labels=_labels(spec, num_classes),
        weights=weights,
        layers=layers,
        default_layer=default,
        autocast_dtype=autocast_dtype,
    )
    if warmup:
        warm_up(loaded)
    return loaded


def warm_up(model: LoadedModel) -> None:
    """One explain pass (a forward and a backward), so the first real request pays no start-up
    cost."""
    inputs = torch.zeros(1, model.preprocessing.channels, *model.input_size, device=model.device)
    explain(model, inputs, [ImageRequest()], method="gradcam")
