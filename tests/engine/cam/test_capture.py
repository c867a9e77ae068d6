"""Layer capture on a shared model: no hook outlives its call, threads do not mix, no leaks."""

from __future__ import annotations

import gc
import random
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import service.engine.cam.explain as explain_module
from service.engine.cam.capture import LayerCapture
from service.engine.cam.explain import ImageRequest, explain, predict
from service.engine.loading import load_model
from service.engine.models.loaded import LoadedModel
from service.engine.models.spec import ModelSpec, PreprocessOverrides
from service.errors import UnknownLayerError, UnknownTargetError

Loader = Callable[..., LoadedModel]
SMALL = {"channels": (16, 32, 64, 64), "stem_width": 16}
SMALL_INPUT = {"input_size": (96, 96), "crop_pct": 1.0}


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        + len(module._backward_pre_hooks)
        for module in model.modules()
    )


def _private_model() -> LoadedModel:
    """A model of this test's own, for tests that patch it."""
    spec = ModelSpec(
        name="private",
        architecture="resnet18",
        weights="random",
        model_kwargs=SMALL,
        preprocessing=PreprocessOverrides(**SMALL_INPUT),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_model(spec, torch.device("cpu"))


@pytest.fixture
def small(load_tiny: Loader) -> LoadedModel:
    return load_tiny("resnet18", preprocessing=SMALL_INPUT, **SMALL)


def _inputs(model: LoadedModel, batch: int, seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.input_size, generator=generator)


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam"])
def test_no_hook_survives_a_call(small: LoadedModel, method: str) -> None:
    assert _hook_count(small.module) == 0
    explain(
        small,
        _inputs(small, 2),
        [ImageRequest(("layer4", "layer2"), (1,)), ImageRequest(("layer3",), top_k=2)],
        method=method,
    )
    assert _hook_count(small.module) == 0


def test_hooks_are_counted_while_the_call_runs(small: LoadedModel) -> None:
    """The check above can fail: during a capture the hooks are there."""
    with LayerCapture(small.module, ["layer4", "layer2"], with_grad=True) as capture:
        assert _hook_count(small.module) == 2
        assert capture.active_hooks() == 2
    assert _hook_count(small.module) == 0
    assert capture.active_hooks() == 0


def test_no_hook_survives_an_exception_inside_the_forward_pass() -> None:
    model = _private_model()
    seen: list[str] = []

    def broken_forward(x: torch.Tensor) -> torch.Tensor:
        seen.append("layer4")
        raise RuntimeError("layer4 exploded")

    # layer2's hook has fired by the time layer4 runs.
    model.module.layer4.forward = broken_forward  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="layer4 exploded"):
        explain(model, _inputs(model, 1), [ImageRequest(("layer2",), (1,))])
    assert seen == ["layer4"]
    assert _hook_count(model.module) == 0
    del model.module.layer4.forward
    result = explain(model, _inputs(model, 1), [ImageRequest(("layer2",), (1,))])
    assert np.isfinite(result.maps[0][0].input_map).all()
    assert _hook_count(model.module) == 0


def test_no_hook_survives_an_invalid_target(small: LoadedModel) -> None:
    with pytest.raises(UnknownTargetError):
        explain(small, _inputs(small, 1), [ImageRequest(("layer4",), (small.num_classes,))])
    assert _hook_count(small.module) == 0


def test_no_hook_survives_a_missing_layer_name(small: LoadedModel) -> None:
    with (
        pytest.raises(UnknownLayerError, match="no layer named 'nope'"),
        LayerCapture(small.module, ["layer4", "nope"], with_grad=True),
    ):
        pytest.fail("the capture must not start")
    assert _hook_count(small.module) == 0


def test_layer_run_twice_per_forward_is_refused_and_unhooked() -> None:
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential()
    model.add_module("first", shared)
    model.add_module("relu", nn.ReLU())
    model.add_module("again", shared)
    with (
        pytest.raises(UnknownLayerError, match="more than once"),
        LayerCapture(model, ["first"], with_grad=True),
    ):
        model(torch.zeros(1, 3, 8, 8))
    assert _hook_count(model) == 0


def test_capture_hooks_ignore_forward_passes_of_other_calls(small: LoadedModel) -> None:
    """A plain forward on another thread while a capture is open records nothing."""
    x = _inputs(small, 1)
    with LayerCapture(small.module, ["layer4"], with_grad=False) as capture:
        worker = threading.Thread(target=lambda: predict(small, x))
        worker.start()
        worker.join()
        assert capture.outputs == {}
        with torch.no_grad():
            small.module(x)
        assert set(capture.outputs) == {"layer4"}


def test_concurrent_calls_on_one_model_equal_single_threaded_results(
    small: LoadedModel,
) -> None:
    x = _inputs(small, 2, seed=21)
    jobs = [
        (layers, targets)
        for layers in (("layer4",), ("layer3",), ("layer2", "layer4"), ("layer1",))
        for targets in ((1,), (2, 3), (4,), (5, 6), (7,))
    ]

    def run(job: tuple[tuple[str, ...], tuple[int, ...]]) -> list[np.ndarray]:
        layers, targets = job
        result = explain(small, x, [ImageRequest(layers, targets), ImageRequest(layers)])
        return [cam.input_map for maps in result.maps for cam in maps]

    expected = [run(job) for job in jobs]
    order = list(range(len(jobs)))
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {i: pool.submit(run, jobs[i]) for i in order}
        results = {i: future.result() for i, future in futures.items()}
    for i, job in enumerate(jobs):
        assert len(results[i]) == len(expected[i]), job
        for got, want in zip(results[i], expected[i], strict=True):
            assert np.abs(got - want).max() <= 1e-5, job
    assert _hook_count(small.module) == 0


def _rss_bytes() -> int:
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * 4096


def _live_tensors() -> int:
    gc.collect()
    # type() rather than isinstance(): isinstance reads __class__, which warns on some objects.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.fixture
def captured_refs(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[torch.Tensor]]:
    """Weak references to every tensor a capture recorded, through explain's LayerCapture."""
    refs: list[weakref.ref[torch.Tensor]] = []

    class RecordingCapture(LayerCapture):
        def __exit__(self, *args: object) -> None:
            refs.extend(weakref.ref(t) for t in self.outputs.values())
            super().__exit__(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(explain_module, "LayerCapture", RecordingCapture)
    return refs


def test_memory_stays_flat_over_many_calls(
    load_tiny: Loader, captured_refs: list[weakref.ref[torch.Tensor]]
) -> None:
    model = load_tiny("resnet18", preprocessing={"input_size": (64, 64), "crop_pct": 1.0}, **SMALL)
    x = _inputs(model, 2)
    requests = [ImageRequest(("layer4", "layer2"), (1, 2)), ImageRequest(("layer3",))]
    for _ in range(20):  # warm up the allocator and any lazy state
        explain(model, x, requests)
    captured_refs.clear()
    tensors_before = _live_tensors()
    rss_before = _rss_bytes()
    for _ in range(200):
        result = explain(model, x, requests)
    del result
    tensors_after = _live_tensors()
    rss_growth = _rss_bytes() - rss_before
    assert len(captured_refs) == 200 * 3
    assert all(ref() is None for ref in captured_refs), "a captured layer output is still alive"
    assert tensors_after - tensors_before <= 2
    # One call's captured tensors are about 100 kB here: a leak of one per call would be 20 MB.
    assert rss_growth < 16 * 1024 * 1024
    assert _hook_count(model.module) == 0
