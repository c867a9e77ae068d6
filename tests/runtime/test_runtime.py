"""The serving runtime: batching across callers, backpressure, deadlines, faults, shutdown."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.cam.explain import ImageRequest, PostProcess, explain
from service.engine.faithfulness.scores import ScoreOptions
from service.engine.imaging.images import DecodedImage, decode_image
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import preprocess
from service.engine.models.spec import ModelSpec
from service.engine.plan import ExplainPlan
from service.errors import (
    DeadlineExceededError,
    InvalidParameterError,
    ModelNotReadyError,
    OverloadedError,
    UnknownModelError,
    WorkerError,
)
from service.metrics import Metrics
from service.runtime import workers
from service.runtime.config import RuntimeConfig
from service.runtime.jobs import ExplainJob, OutputOptions, PredictJob
from service.runtime.runtime import Runtime


def _plan(
    layers: tuple[str, ...] = (),
    targets: tuple[int, ...] | None = None,
    top_k: int = 1,
    method: str = "gradcam",
    post: PostProcess | None = None,
    scores: ScoreOptions | None = None,
) -> ExplainPlan:
    return ExplainPlan(ImageRequest(layers, targets, top_k), method, post or PostProcess(), scores)


TINY = ModelSpec(
    name="tiny",
    architecture="resnet18",
    num_classes=4,
    weights="random",
    labels=["cat", "dog", "bird", "fish"],
    preprocessing={"input_size": (64, 64), "crop_pct": 1.0},
)
NO_RENDER = OutputOptions(heatmap=True, upsampled="none", overlay="none")


def _image(seed: int, size: tuple[int, int] = (80, 96)) -> DecodedImage:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return decode_image(buffer.getvalue())


def _run(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


async def _started(config: RuntimeConfig) -> Runtime:
    runtime = Runtime([TINY], config, Metrics())
    await runtime.start()
    assert await runtime.wait_ready(120), runtime.statuses()
    return runtime


class _Gate:
    """Holds every worker batch until released, counting the images that reach compute."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.computed = 0
        self.batches: list[int] = []
        real = workers.run_group

        def gated(replica: Any, group: list[Any], config: RuntimeConfig, *rest: Any) -> Any:
            self.open.wait(timeout=30)
            self.computed += len(group)
            self.batches.append(len(group))
            return real(replica, group, config, *rest)

        monkeypatch.setattr(workers, "run_group", gated)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Gate]:
    g = _Gate(monkeypatch)
    yield g
    g.open.set()


def test_concurrent_callers_with_different_targets_and_layers_get_their_own_maps() -> None:
    images = [_image(i) for i in range(12)]
    layers = [("layer4",), ("layer3",), ("layer4", "layer2")]

    async def scenario() -> tuple[list[Any], LoadedModel]:
        runtime = await _started(RuntimeConfig(max_batch_size=8, max_batch_wait_ms=50))
        model = runtime.model("tiny")
        try:
            jobs = [
                ExplainJob(
                    image=image,
                    plan=_plan(layers=layers[i % 3], targets=(i % 4,)),
                    outputs=NO_RENDER,
                )
                for i, image in enumerate(images)
            ]
            results = await asyncio.gather(*(runtime.explain("tiny", [job]) for job in jobs))
            return results, model
        finally:
            await runtime.stop()

    results, model = _run(scenario)
    assert max(r[0].timings.batch_size for r in results) > 1, "callers were never batched"
    for i, (outcome,) in enumerate(results):
        tensor, _ = preprocess(images[i].image, model.preprocessing)
        alone = explain(
            model, tensor[None], [ImageRequest(layers=layers[i % 3], targets=(i % 4,))]
        ).maps[0]
        assert [m.cam.layer for m in outcome.maps] == [m.layer for m in alone]
        for got, want in zip(outcome.maps, alone, strict=True):
            assert got.cam.target == i % 4
            np.testing.assert_allclose(got.cam.input_map, want.input_map, atol=1e-5)
            np.testing.assert_allclose(got.cam.grid, want.grid, rtol=1e-4, atol=1e-6)


def test_predict_batches_and_returns_probabilities_per_image() -> None:
    images = [_image(i) for i in range(5)]

    async def scenario() -> list[Any]:
        runtime = await _started(RuntimeConfig())
        try:
            return await runtime.predict("tiny", [PredictJob(image=im) for im in images])
        finally:
            await runtime.stop()

    outcomes = _run(scenario)
    assert len(outcomes) == 5
    for outcome in outcomes:
        assert outcome.probabilities.shape == (4,)
        assert outcome.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_requests_past_the_queue_limit_are_refused_with_retry_after(gate: _Gate) -> None:
    async def scenario() -> tuple[OverloadedError, list[Any]]:
        runtime = await _started(RuntimeConfig(max_batch_size=2, max_queue_size=4))
        try:
            job = ExplainJob(image=_image(0), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
            first = asyncio.create_task(runtime.explain("tiny", [job]))  # taken by the worker
            await asyncio.sleep(0.2)
            queued = [asyncio.create_task(runtime.explain("tiny", [job] * 2)) for _ in range(2)]
            await asyncio.sleep(0.1)
            with pytest.raises(OverloadedError) as refused:
                await runtime.explain("tiny", [job])
            gate.open.set()
            done = await asyncio.gather(first, *queued)
            return refused.value, done
        finally:
            gate.open.set()
            await runtime.stop()

    refused, done = _run(scenario)
    assert refused.retry_after_s is not None
    assert refused.retry_after_s >= 1
    assert "queued" in refused.detail
    assert len(done) == 3, "requests under the limit must all be served"


def test_deadline_answers_timeout_and_drops_queued_work(gate: _Gate) -> None:
    async def scenario() -> None:
        runtime = await _started(RuntimeConfig(request_timeout_s=0.5, max_batch_size=1))
        try:
            job = ExplainJob(image=_image(0), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
            busy = asyncio.create_task(runtime.explain("tiny", [job]))
            await asyncio.sleep(0.1)
            with pytest.raises(DeadlineExceededError):
                await runtime.explain("tiny", [job] * 3)
            gate.open.set()
            with pytest.raises(DeadlineExceededError):
                await busy  # it was computing past its own deadline
            await asyncio.sleep(0.5)
        finally:
            gate.open.set()
            await runtime.stop()

    _run(scenario)
    assert gate.computed == 1, "the timed-out request's queued images must not be computed"


def test_worker_fault_fails_only_its_batch_and_the_worker_carries_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = workers.run_group
    calls = {"n": 0}

    def flaky(replica: Any, group: list[Any], config: RuntimeConfig, *rest: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated CUDA failure at /secret/path.py")
        return real(replica, group, config, *rest)

    monkeypatch.setattr(workers, "run_group", flaky)
    metrics = Metrics()

    async def scenario() -> None:
        runtime = Runtime([TINY], RuntimeConfig(max_batch_size=1), metrics)
        await runtime.start()
        assert await runtime.wait_ready(120)
        try:
            job = ExplainJob(image=_image(0), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
            with pytest.raises(WorkerError) as failed:
                await runtime.explain("tiny", [job])
            assert "/secret" not in failed.value.detail
            (after,) = await runtime.explain("tiny", [job])
            assert after.maps
        finally:
            await runtime.stop()

    _run(scenario)
    assert b'gradcam_worker_errors_total{error="RuntimeError",model="tiny"} 1.0' in (
        metrics.render()
    )


def test_out_of_memory_batch_is_retried_image_by_image(monkeypatch: pytest.MonkeyPatch) -> None:
    real = workers.run_batch
    sizes: list[int] = []

    def oom_on_batches(replica: Any, group: list[Any], config: RuntimeConfig, *rest: Any) -> Any:
        sizes.append(len(group))
        if len(group) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(replica, group, config, *rest)

    monkeypatch.setattr(workers, "run_batch", oom_on_batches)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    async def scenario() -> list[Any]:
        runtime = await _started(RuntimeConfig(max_batch_size=4, max_batch_wait_ms=100))
        try:
            job = ExplainJob(image=_image(1), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
            return await runtime.explain("tiny", [job] * 3)
        finally:
            await runtime.stop()

    outcomes = _run(scenario)
    assert len(outcomes) == 3
    assert all(o.maps for o in outcomes)
    assert sizes[0] == 3
    assert sizes[1:] == [1, 1, 1]


def test_an_image_that_alone_runs_out_of_memory_fails_only_its_caller(
    monkeypatch: pytest.MonkeyPatch, gate: _Gate
) -> None:
    real = workers.run_batch
    sizes: list[int] = []

    def oom_on_batches_and_the_doomed_image(
        replica: Any, group: list[Any], config: Any, *rest: Any
    ) -> Any:
        sizes.append(len(group))
        if len(group) > 1 or group[0].request.top_k == 2:  # top_k=2 marks the doomed image
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(replica, group, config, *rest)

    monkeypatch.setattr(workers, "run_batch", oom_on_batches_and_the_doomed_image)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    async def scenario() -> list[Any]:
        runtime = await _started(RuntimeConfig(max_batch_size=4))
        try:
            fine = ExplainJob(image=_image(1), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
            doomed = ExplainJob(
                image=_image(2), plan=_plan(layers=("layer4",), top_k=2), outputs=NO_RENDER
            )
            first = asyncio.create_task(runtime.explain("tiny", [fine], "a"))
            await asyncio.sleep(0.2)  # taken by the worker, held at the gate
            calls = [
                runtime.explain("tiny", [job], caller)
                for job, caller in ((doomed, "b"), (fine, "c"))
            ]
            queued = [asyncio.create_task(call) for call in calls]
            await asyncio.sleep(0.1)
            gate.open.set()  # the other two now go as one batch of 2
            return await asyncio.gather(first, *queued, return_exceptions=True)
        finally:
            gate.open.set()
            await runtime.stop()

    first, second, third = _run(scenario)
    assert sizes == [1, 2, 1, 1], "the batch of 2 ran out of memory, then image by image"
    assert first[0].maps
    assert third[0].maps
    assert isinstance(second, WorkerError)
    assert second.code == "out_of_memory"


def test_stop_finishes_queued_work_then_refuses_new_requests() -> None:
    async def scenario() -> None:
        runtime = await _started(RuntimeConfig(max_batch_size=2))
        job = ExplainJob(image=_image(2), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
        in_flight = [asyncio.create_task(runtime.explain("tiny", [job])) for _ in range(6)]
        await asyncio.sleep(0.05)
        await runtime.stop()
        results = await asyncio.gather(*in_flight)
        assert all(r[0].maps for r in results)
        with pytest.raises(ModelNotReadyError):
            await runtime.explain("tiny", [job])

    _run(scenario)


def test_unknown_model_and_not_ready_model_are_reported() -> None:
    async def scenario() -> None:
        runtime = Runtime([TINY], RuntimeConfig(), Metrics())
        with pytest.raises(ModelNotReadyError):
            runtime.model("tiny")  # not started: still loading
        with pytest.raises(UnknownModelError) as unknown:
            runtime.model("nope")
        assert unknown.value.allowed == ["tiny"]
        await runtime.stop()

    _run(scenario)


def test_scorecam_cost_is_bounded_per_request_before_queueing() -> None:
    async def scenario() -> None:
        runtime = await _started(RuntimeConfig(explain_max_forward_passes=100))
        try:
            job = ExplainJob(
                image=_image(3),
                plan=_plan(layers=("layer4",), method="scorecam"),
                outputs=NO_RENDER,
            )
            with pytest.raises(InvalidParameterError) as refused:
                await runtime.explain("tiny", [job])
            assert refused.value.code == "scorecam_too_costly"
        finally:
            await runtime.stop()

    _run(scenario)


def test_score_cost_is_bounded_per_request_before_queueing() -> None:
    async def scenario() -> None:
        runtime = await _started(RuntimeConfig(score_max_forward_passes=2 * 4 * 3))
        try:
            road = ScoreOptions(names=("road",))  # 8 passes a map
            jobs = [
                ExplainJob(
                    image=_image(i), plan=_plan(layers=("layer4",), scores=road), outputs=NO_RENDER
                )
                for i in range(4)
            ]
            admitted = await runtime.explain("tiny", jobs[:3])
            assert all(set(o.maps[0].cam.scores) == {"road"} for o in admitted)
            with pytest.raises(InvalidParameterError) as refused:
                await runtime.explain("tiny", jobs)
            assert refused.value.code == "scores_too_costly"
            assert "32 forward passes" in refused.value.detail
        finally:
            await runtime.stop()

    _run(scenario)


def test_items_share_an_engine_call_only_with_the_same_scores() -> None:
    tensor = torch.zeros(3, 64, 64)
    road = workers.WorkItem("explain", tensor, scores=ScoreOptions(names=("road",)))
    same = workers.WorkItem("explain", tensor, scores=ScoreOptions(names=("road",)))
    other = workers.WorkItem(
        "explain", tensor, scores=ScoreOptions(names=("road",), road_percentiles=(50,))
    )
    plain = workers.WorkItem("explain", tensor)
    assert road.group_key() == same.group_key()
    assert len({road.group_key(), other.group_key(), plain.group_key()}) == 3


def test_renderings_follow_the_output_options() -> None:
    image = _image(4, size=(120, 90))

    async def scenario() -> list[Any]:
        runtime = await _started(RuntimeConfig())
        try:
            options = [
                OutputOptions(upsampled="original", overlay="png"),
                OutputOptions(upsampled="input", overlay="panel"),
                OutputOptions(upsampled="none", overlay="none"),
            ]
            return [
                (
                    await runtime.explain(
                        "tiny", [ExplainJob(image=image, plan=_plan(layers=("layer3",)), outputs=o)]
                    )
                )[0]
                for o in options
            ]
        finally:
            await runtime.stop()

    original, panel, bare = _run(scenario)
    first = original.maps[0]
    assert first.upsampled is not None
    assert first.upsampled.shape == (90, 120)
    assert first.overlay is not None
    assert first.overlay.startswith(b"\x89PNG")
    assert first.overlay_size == (120, 90)
    second = panel.maps[0]
    assert second.upsampled is not None
    assert second.upsampled.shape == (64, 64)
    assert second.overlay_size is not None
    assert second.overlay_size[0] > 3 * 120 // 2
    assert bare.maps[0].overlay is None
    assert bare.maps[0].upsampled is None


def test_requests_predicted_to_wait_past_the_bound_are_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = workers.run_group

    def slow(replica: Any, group: list[Any], config: RuntimeConfig, *rest: Any) -> Any:
        time.sleep(0.5)
        return real(replica, group, config, *rest)

    monkeypatch.setattr(workers, "run_group", slow)
    metrics = Metrics()

    async def scenario() -> tuple[OverloadedError, OverloadedError, list[Any]]:
        runtime = Runtime([TINY], RuntimeConfig(max_batch_size=1, max_queue_wait_ms=700), metrics)
        await runtime.start()
        assert await runtime.wait_ready(120)
        try:
            job = ExplainJob(image=_image(0), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
            await runtime.explain("tiny", [job])  # the warm-up: not measured
            await runtime.explain("tiny", [job])  # measures about 0.5 s per image
            accepted = [asyncio.create_task(runtime.explain("tiny", [job])) for _ in range(2)]
            await asyncio.sleep(0.05)  # one running (0.45 s left), one queued: 0.95 s ahead
            with pytest.raises(OverloadedError) as early:
                runtime.check_admission("tiny", 1)
            with pytest.raises(OverloadedError) as queued:
                await runtime.explain("tiny", [job])
            return early.value, queued.value, await asyncio.gather(*accepted)
        finally:
            await runtime.stop()

    early, queued, accepted = _run(scenario)
    for refused in (early, queued):
        assert refused.code == "overloaded"
        assert "would wait about" in refused.detail
        assert refused.retry_after_s is not None
        assert refused.retry_after_s >= 1
    assert len(accepted) == 2
    text = metrics.render().decode()
    assert 'gradcam_rejected_total{model="tiny",reason="queue_wait"} 2.0' in text
    assert 'gradcam_admitted_total{model="tiny"} 4.0' in text
    assert "gradcam_predicted_wait_seconds" in text


def test_the_threshold_floor_stays_in_resized_maps_and_overlays() -> None:
    image = _image(5, size=(80, 80))  # square: the tiny model's centre crop sees all of it
    floor = PostProcess(mode="threshold", threshold=0.25)
    options = OutputOptions(upsampled="original", overlay="png", alpha=1.0, colormap="gray")

    async def scenario() -> list[Any]:
        runtime = await _started(RuntimeConfig())
        try:
            return [
                (
                    await runtime.explain(
                        "tiny",
                        [
                            ExplainJob(
                                image=image,
                                plan=_plan(
                                    layers=("layer2", "layer3", "layer4"), top_k=4, post=post
                                ),
                                outputs=options,
                            )
                        ],
                    )
                )[0]
                for post in (floor, PostProcess())
            ]
        finally:
            await runtime.stop()

    thresholded, relu = _run(scenario)
    # A map with a positive peak (random weights leave some maps empty: no floor there).
    index = next(i for i, m in enumerate(thresholded.maps) if m.cam.raw_max > 0)
    floored, plain = thresholded.maps[index], relu.maps[index]
    assert floored.upsampled is not None
    assert plain.upsampled is not None
    assert floored.upsampled.min() >= 0.25 - 1e-3, "the floor must not be normalised away"
    assert floored.upsampled.max() <= 1.0 + 1e-6
    assert plain.upsampled.min() == pytest.approx(0.0, abs=1e-6)
    assert floored.overlay is not None
    grey = np.asarray(Image.open(io.BytesIO(floored.overlay)).convert("L"))
    assert grey.min() >= round(0.25 * 255) - 2, "the overlay shows the floor, not black"


def test_torch_threads_bounds_the_intra_op_threads_of_each_replicas_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    real = workers.run_group

    def counting(replica: Any, group: list[Any], config: RuntimeConfig, *rest: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real(replica, group, config, *rest)

    monkeypatch.setattr(workers, "run_group", counting)

    async def scenario() -> None:
        runtime = await _started(RuntimeConfig(torch_threads=1))
        try:
            await runtime.predict("tiny", [PredictJob(_image(0))])
        finally:
            await runtime.stop()

    before = torch.get_num_threads()
    try:
        _run(scenario)
        assert seen == [1]
        assert torch.get_num_threads() == before, "a running thread's setting changed"
    finally:  # the setting is also the default of threads started later: put it back
        restore = threading.Thread(target=torch.set_num_threads, args=(before,))
        restore.start()
        restore.join()
