"""Long jobs (Score-CAM, the faithfulness scores) never freeze a model: they stop when nobody
waits for them, lend their worker to other callers between chunks, and are refused up front
when they would outlast the deadline.

The tiny model is slowed down by a hook that sleeps in every masked forward pass, so a
Score-CAM job lasts seconds; assertions are about the worker's state and the forward passes
that ran, not about tight timings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from service.engine.cam.costs import Cost
from service.errors import DeadlineExceededError, InvalidParameterError
from service.metrics import Metrics
from service.runtime.config import RuntimeConfig
from service.runtime.jobs import ExplainJob, PredictJob
from service.runtime.pacing import Pace
from service.runtime.runtime import Runtime
from service.runtime.workers import ServedModel
from tests.runtime.test_runtime import NO_RENDER, TINY, _image, _plan

CHUNK = 8  # masked inputs per forward pass (perturbation_batch_size)
SLEEP_S = 0.05  # per masked forward pass: layer4's 512 channels take 64 chunks, over 3 s


class _Slowed:
    """Counts the model's forward passes by rows and sleeps in the masked ones (> 1 row)."""

    def __init__(self, runtime: Runtime) -> None:
        self.masked = 0
        self.masked_rows = 0
        self.single = 0
        self._lock = threading.Lock()
        self._handle = runtime.model("tiny").module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        with self._lock:
            if args[0].shape[0] > 1:
                self.masked += 1
                self.masked_rows += args[0].shape[0]
            else:
                self.single += 1
        if args[0].shape[0] > 1:
            time.sleep(SLEEP_S)

    def remove(self) -> None:
        self._handle.remove()


def _served(runtime: Runtime) -> ServedModel:
    return runtime._served["tiny"]  # white-box: the model's worker state


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def _scorecam() -> ExplainJob:
    return ExplainJob(
        image=_image(3), plan=_plan(layers=("layer4",), method="scorecam"), outputs=NO_RENDER
    )


async def _with_runtime(
    config: RuntimeConfig, body: Callable[[Runtime, _Slowed, Metrics], Awaitable[Any]]
) -> Any:
    metrics = Metrics()
    runtime = Runtime([TINY], config, metrics)
    await runtime.start()
    assert await runtime.wait_ready(120)
    slowed = _Slowed(runtime)
    try:
        return await body(runtime, slowed, metrics)
    finally:
        slowed.remove()
        await runtime.stop()


# A slice far longer than a chunk (about 50 ms, the hook's sleep): chunks stay CHUNK rows, told
# apart from single-image passes, even when a loaded machine makes the first pass look slow.
CONFIG = RuntimeConfig(perturbation_batch_size=CHUNK, max_batch_size=4, work_slice_ms=500)


def test_an_abandoned_scorecam_request_stops_within_a_chunk_and_frees_the_worker() -> None:
    async def body(runtime: Runtime, slowed: _Slowed, metrics: Metrics) -> None:
        served = _served(runtime)
        job = asyncio.create_task(runtime.explain("tiny", [_scorecam()], "a"))
        await _until(lambda: slowed.masked >= 3)
        assert served.batcher.solo_running == 1
        job.cancel()  # the client went away
        at_cancel = slowed.masked
        await _until(lambda: served.batcher.solo_running == 0, timeout=5.0)
        assert slowed.masked <= at_cancel + 1, "chunks kept running after the caller left"
        (outcome,) = await asyncio.wait_for(
            runtime.predict("tiny", [PredictJob(_image(4))], "b"), 2.0
        )
        assert outcome.probabilities.shape == (4,)
        assert b'gradcam_abandoned_jobs_total{model="tiny"} 1.0' in metrics.render()
        with pytest.raises(asyncio.CancelledError):
            await job

    asyncio.run(_with_runtime(CONFIG, body))


def test_a_deadline_passed_during_a_long_job_answers_504_and_stops_the_work() -> None:
    async def body(runtime: Runtime, slowed: _Slowed, metrics: Metrics) -> None:
        served = _served(runtime)
        served.pace.pass_s = 1e-4  # predicted well inside the deadline, so it is admitted
        with pytest.raises(DeadlineExceededError):
            await runtime.explain("tiny", [_scorecam()], "a")
        at_deadline = slowed.masked
        assert at_deadline < 512 // CHUNK, "the job ran to its end"
        await _until(lambda: served.batcher.solo_running == 0, timeout=5.0)
        await asyncio.sleep(3 * SLEEP_S)
        assert slowed.masked <= at_deadline + 1
        assert b'gradcam_abandoned_jobs_total{model="tiny"} 1.0' in metrics.render()

    asyncio.run(_with_runtime(RuntimeConfig(**{**_fields(CONFIG), "request_timeout_s": 1.0}), body))


def test_another_callers_predict_and_explain_are_answered_while_a_long_job_runs() -> None:
    async def body(runtime: Runtime, slowed: _Slowed, metrics: Metrics) -> None:
        served = _served(runtime)
        job = asyncio.create_task(runtime.explain("tiny", [_scorecam()], "a"))
        await _until(lambda: slowed.masked >= 2)
        started = time.perf_counter()
        (predicted,) = await runtime.predict("tiny", [PredictJob(_image(5))], "b")
        gradcam = ExplainJob(image=_image(6), plan=_plan(layers=("layer3",)), outputs=NO_RENDER)
        (explained,) = await runtime.explain("tiny", [gradcam], "c")
        waited = time.perf_counter() - started
        assert not job.done(), "the long job should still be running"
        assert explained.maps
        assert predicted.probabilities.shape == (4,)
        assert waited < 2.0  # a few chunks at most, not the job's 3+ s
        # The light work ran in the long job's own worker thread, between its chunks.
        assert served.batcher.solo_running == 1
        (long_outcome,) = await job
        assert long_outcome.maps[0].cam.method == "scorecam"
        assert slowed.masked_rows == 512, "every channel's masked input ran once"

    asyncio.run(_with_runtime(CONFIG, body))


def test_a_long_job_predicted_to_outlast_the_deadline_is_refused_before_it_is_queued() -> None:
    async def body(runtime: Runtime, slowed: _Slowed, metrics: Metrics) -> None:
        served = _served(runtime)
        served.pace.pass_s = 0.5  # as on a slow device: 513 passes, about 256 s
        with pytest.raises(InvalidParameterError) as refused:
            await runtime.explain("tiny", [_scorecam()], "a")
        assert refused.value.code == "scorecam_too_costly"
        assert "about 256 s" in refused.value.detail
        assert "the deadline is 60 s" in refused.value.detail
        assert "512 forward passes at 500 ms each" in refused.value.detail
        assert slowed.masked == 0, "nothing may run for it"
        assert slowed.single == 0
        assert served.batcher.depth == 0
        # A gradient method on the same image is not a long job: no such refusal.
        gradcam = ExplainJob(image=_image(3), plan=_plan(layers=("layer4",)), outputs=NO_RENDER)
        assert (await runtime.explain("tiny", [gradcam], "a"))[0].maps

    asyncio.run(_with_runtime(CONFIG, body))


def test_a_long_job_leaves_the_predicted_wait_of_a_predict_as_it_was() -> None:
    async def body(runtime: Runtime, slowed: _Slowed, metrics: Metrics) -> None:
        served = _served(runtime)
        for seed in range(3):  # the time per item is measured on light batches
            await runtime.predict("tiny", [PredictJob(_image(seed))], "b")
        per_item = served.batcher.item_seconds
        assert served.batcher.predicted_wait_s(1, "b") == 0.0
        job = asyncio.create_task(runtime.explain("tiny", [_scorecam()], "a"))
        await _until(lambda: slowed.masked >= 2)
        # While it runs, a predict waits for one slice of it at most, not for all of it.
        assert served.batcher.predicted_wait_s(1, "b") == pytest.approx(CONFIG.work_slice_ms / 1000)
        assert served.batcher.solo_backlog_s() > 0
        assert b'gradcam_long_jobs{model="tiny",state="running"} 1.0' in metrics.render()
        await job
        assert served.batcher.predicted_wait_s(1, "b") == 0.0
        assert served.batcher.item_seconds == pytest.approx(per_item, rel=1.0)
        assert served.batcher.item_seconds < 0.1  # not the job's seconds per item
        assert served.pace.pass_s is not None
        assert served.pace.pass_s >= SLEEP_S / CHUNK / 2

    asyncio.run(_with_runtime(CONFIG, body))


def test_a_second_long_job_waits_for_the_first_and_is_told_how_long() -> None:
    async def body(runtime: Runtime, slowed: _Slowed, metrics: Metrics) -> None:
        served = _served(runtime)
        served.pace.pass_s = SLEEP_S / CHUNK  # as measured: about 3.2 s a job
        first = asyncio.create_task(runtime.explain("tiny", [_scorecam()], "a"))
        await _until(lambda: slowed.masked >= 2)
        wait = served.batcher.predicted_wait_s(1, "b", solo_s=3.2)
        assert 1.0 < wait < 4.0  # what remains of the first job
        first.cancel()
        await _until(lambda: served.batcher.solo_running == 0, timeout=5.0)
        assert served.batcher.predicted_wait_s(1, "b", solo_s=3.2) == 0.0

    asyncio.run(_with_runtime(CONFIG, body))


def test_pace_sizes_chunks_to_the_slice_and_predicts_from_the_declared_cost() -> None:
    pace = Pace()
    assert pace.chunk(0.25, 32) == 32  # nothing measured: the configured batch
    assert pace.seconds(Cost(forward_passes=100), 1) == 0.0
    pace.observe(Cost(forward_passes=10), 0.5)  # 50 ms a pass
    assert pace.chunk(0.25, 32) == 5
    assert pace.chunk(0.01, 32) == 1
    assert pace.seconds(Cost(forward_passes=99, backward_passes=2), 1) == pytest.approx(5.2)
    pace.observe(Cost(cpu_solves=4), 0.8)
    assert pace.seconds(Cost(cpu_solves=10), 0) == pytest.approx(2.0)


def _fields(config: RuntimeConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}
