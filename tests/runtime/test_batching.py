"""The batcher on its own: plain items and a fake handler, no model."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Hashable
from typing import Any, TypeVar

import pytest

from service.runtime.batching import Batched, Batcher, QueueFullError

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Recorder:
    """A handler that doubles numbers, records each call, and can be held or made to fail."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail_on: set[int] = set()

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await self.release.wait()
        if self.fail_on & set(items):
            raise ValueError(f"bad item in {items}")
        return [2 * item for item in items]


def _batcher(**overrides: Any) -> Batcher[int, int]:
    options: dict[str, Any] = {"max_batch_size": 4, "max_batch_wait_s": 0.05, "max_queue_size": 16}
    options.update(overrides)
    return Batcher(**options)


async def _stop(batcher: Batcher[int, int], loops: list[asyncio.Task[None]]) -> None:
    batcher.close()
    await asyncio.wait_for(asyncio.gather(*loops), 5)


def test_concurrent_callers_share_a_batch_and_each_gets_its_own_result() -> None:
    async def scenario() -> tuple[list[list[Batched[int]]], list[list[int]]]:
        batcher = _batcher()
        handler = Recorder()
        with batcher.arriving(1):  # more items on their way: worth waiting for
            results = asyncio.gather(*(batcher.submit([i, 10 + i]) for i in range(2)))
            loops = [asyncio.create_task(batcher.run(handler))]
            answers = await results
        await _stop(batcher, loops)
        return answers, handler.calls

    answers, calls = _run(scenario())
    assert calls == [[0, 10, 1, 11]]
    assert [[r.value for r in answer] for answer in answers] == [[0, 20], [2, 22]]
    assert all(r.batch_size == 4 for answer in answers for r in answer)
    assert all(r.queued_s >= 0 and r.compute_s >= 0 for answer in answers for r in answer)


def test_a_full_batch_goes_at_once_and_the_rest_waits_for_the_next() -> None:
    async def scenario() -> list[list[int]]:
        batcher = _batcher(max_batch_size=2, max_batch_wait_s=10.0)
        handler = Recorder()
        with batcher.arriving(1):  # would hold a partial batch for the whole (long) budget
            loops = [asyncio.create_task(batcher.run(handler))]
            first = asyncio.create_task(batcher.submit([1, 2]))
            await asyncio.wait_for(first, 1.0)  # full: no wait for the 10 s budget
        await asyncio.wait_for(batcher.submit([3]), 1.0)
        await _stop(batcher, loops)
        return handler.calls

    assert _run(scenario()) == [[1, 2], [3]]


def test_a_lone_item_is_not_held_for_the_wait_budget() -> None:
    async def scenario() -> float:
        batcher = _batcher(max_batch_wait_s=10.0)
        loops = [asyncio.create_task(batcher.run(Recorder()))]
        loop = asyncio.get_running_loop()
        started = loop.time()
        (result,) = await asyncio.wait_for(batcher.submit([5]), 2.0)
        assert result.value == 10
        await _stop(batcher, loops)
        return loop.time() - started

    assert _run(scenario()) < 1.0


def test_the_wait_budget_lets_arriving_items_join_the_batch() -> None:
    async def scenario() -> list[list[int]]:
        batcher = _batcher(max_batch_wait_s=0.5)
        handler = Recorder()
        loops = [asyncio.create_task(batcher.run(handler))]
        with batcher.arriving(1):
            early = asyncio.create_task(batcher.submit([1]))
            await asyncio.sleep(0.05)
            late = asyncio.create_task(batcher.submit([2]))
        await asyncio.gather(early, late)
        await _stop(batcher, loops)
        return handler.calls

    assert _run(scenario()) == [[1, 2]]


def test_items_past_the_queue_bound_are_all_refused_and_none_queued() -> None:
    async def scenario() -> tuple[QueueFullError, int]:
        batcher = _batcher(max_queue_size=3)
        batcher.put([1, 2])
        with pytest.raises(QueueFullError) as refused:
            batcher.put([3, 4])
        return refused.value, batcher.depth

    refused, depth = _run(scenario())
    assert (refused.depth, refused.limit) == (2, 3)
    assert refused.retry_after_s >= 1
    assert depth == 2


def test_predicted_wait_gives_the_batches_ahead_to_the_loop_free_first() -> None:
    async def scenario() -> dict[str, float]:
        batcher = _batcher(max_batch_size=4, max_queue_size=100)
        handler = Recorder()
        loops = [asyncio.create_task(batcher.run(handler)) for _ in range(2)]
        await asyncio.sleep(0)  # the loops start
        batcher.item_seconds = 0.5  # a batch of 4: 2 s
        idle = batcher.predicted_wait_s(16, lane="heavy")
        handler.release.clear()
        batcher.put(list(range(8)), lane="heavy")
        await asyncio.sleep(0.05)  # one batch of 4 in each loop, held by the handler
        batcher.put(list(range(12)), lane="heavy")
        with batcher.arriving(2, lane="other"):
            waits = {
                "idle": idle,
                "light": batcher.predicted_wait_s(1, lane="light"),
                "light, 6": batcher.predicted_wait_s(6, lane="light"),
                "heavy": batcher.predicted_wait_s(1, lane="heavy"),
                "admitted": batcher.admit(1, lane="light"),
            }
        handler.release.set()
        await _stop(batcher, loops)
        waits["measured"] = batcher.item_seconds
        return waits

    waits = _run(scenario())
    # Idle: a request of 16 waits for no one; its own length is its deadline's business.
    assert waits["idle"] == 0.0
    # Running: each loop holds a batch of 4 (2 s) begun 0.05 s ago, so is free in 1.95 s.
    # A new caller's item: 1 from each of the 2 other lanes ahead: the next batch, at 1.95 s.
    assert waits["light"] == pytest.approx(1.95, abs=0.05) == waits["admitted"]
    # Six items of it: the first is where the one item was, its other five do not count.
    assert waits["light, 6"] == pytest.approx(waits["light"], abs=0.01)
    # The heavy caller's next item: its 12 + 2 arriving ahead: 3 batches, the third on the
    # loop that is free again first, at 1.95 + 2 s.
    assert waits["heavy"] == pytest.approx(3.95, abs=0.05)
    assert waits["measured"] < 0.5, "the average follows the measured (fast) batches"


def test_a_running_batch_delays_a_new_item_by_what_remains_of_it_not_a_whole_batch() -> None:
    """The page's case: a lone user's superseded request is still computing (one image) when
    the next arrives. It waits for that one image, and is not refused as if for 8."""

    async def scenario() -> float:
        batcher = _batcher(max_batch_size=8, max_queue_size=100, max_wait_s=2.0)
        handler = Recorder()
        loops = [asyncio.create_task(batcher.run(handler))]
        batcher.item_seconds = 0.5  # a whole batch of 8: 4 s, past the 2 s bound
        handler.release.clear()
        batcher.put([1], lane="tab")
        await asyncio.sleep(0.05)  # in the handler, held
        wait = batcher.admit(1, lane="tab")
        handler.release.set()
        await _stop(batcher, loops)
        return wait

    assert _run(scenario()) == pytest.approx(0.45, abs=0.05)


def test_the_first_call_of_each_group_key_is_not_measured_into_the_time_per_item() -> None:
    """A key's first call pays one-time costs (kernels chosen, buffers allocated): the
    estimate stays at its first value (measured at load) until a warmed-up call is timed."""

    class Warming(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[int] = set()

        async def __call__(self, items: list[int]) -> list[int]:
            key = items[0] % 2
            await asyncio.sleep(0.01 if key in self.seen else 0.4)
            self.seen.add(key)
            return await super().__call__(items)

    async def scenario() -> list[float]:
        batcher = Batcher(
            max_batch_size=4,
            max_batch_wait_s=0.0,
            max_queue_size=16,
            group_key=lambda item: item % 2,
            item_seconds=0.02,
        )
        loops = [asyncio.create_task(batcher.run(Warming()))]
        estimates = []
        for item in (1, 2, 3):  # odd's first call, even's first call, odd's second
            await batcher.submit([item])
            estimates.append(batcher.item_seconds)
        await _stop(batcher, loops)
        return estimates

    first_odd, first_even, warm_odd = _run(scenario())
    assert first_odd == first_even == 0.02, "a first call moved the estimate"
    assert 0.005 < warm_odd < 0.1, "the warmed-up call sets the estimate"


def test_items_predicted_to_wait_past_the_bound_are_refused_with_the_time_to_retry() -> None:
    async def scenario() -> QueueFullError:
        batcher = _batcher(max_batch_size=4, max_queue_size=100, max_wait_s=2.0)
        batcher.item_seconds = 0.25  # a batch: 1 s
        assert batcher.admit(40) == 0.0, "a request's own items never refuse it"
        batcher.put(list(range(12)))  # its first item waits for no one: admitted
        with pytest.raises(QueueFullError) as refused:
            batcher.put(list(range(5)))  # 12 ahead of its first item: 3 batches
        return refused.value

    refused = _run(scenario())
    assert refused.scope == "wait"
    assert refused.predicted_wait_s == pytest.approx(3.0)
    assert refused.retry_after_s == 1.0
    assert refused.limit == 2.0


def test_a_flooding_lane_does_not_get_a_new_callers_request_refused_for_time() -> None:
    async def scenario() -> tuple[QueueFullError, float]:
        batcher = _batcher(max_batch_size=4, max_queue_size=100, max_wait_s=2.0)
        batcher.item_seconds = 0.25
        batcher.put(list(range(12)), lane="heavy")  # its last item: 2 batches ahead, 2 s
        with pytest.raises(QueueFullError) as heavy:
            batcher.put([1], lane="heavy")  # behind its own 12: 3 batches
        return heavy.value, batcher.admit(1, lane="light")

    heavy, light = _run(scenario())
    assert heavy.scope == "wait"
    assert light == 0.0, "one item of another lane goes in the next batch"


def test_a_failing_group_fails_only_its_callers() -> None:
    async def scenario() -> tuple[list[Any], list[list[int]]]:
        batcher: Batcher[int, int] = Batcher(
            max_batch_size=8,
            max_batch_wait_s=0.1,
            max_queue_size=16,
            group_key=lambda item: item % 2,
        )
        handler = Recorder()
        handler.fail_on = {3}
        with batcher.arriving(1):
            calls = [batcher.submit([i]) for i in range(4)]
            loops = [asyncio.create_task(batcher.run(handler))]
            answers = await asyncio.gather(*calls, return_exceptions=True)
        after = await batcher.submit([6])
        await _stop(batcher, loops)
        return [*answers, after], handler.calls

    answers, calls = _run(scenario())
    assert calls[:2] == [[0, 2], [1, 3]]
    assert [r[0].value for r in (answers[0], answers[2])] == [0, 4]
    assert isinstance(answers[1], ValueError)
    assert isinstance(answers[3], ValueError)
    assert answers[4][0].value == 12, "the loop carries on after a failure"


def test_a_handler_that_loses_results_fails_its_callers() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario() -> BaseException | None:
        batcher = _batcher()
        loops = [asyncio.create_task(batcher.run(short))]
        try:
            await batcher.submit([1, 2])
        except RuntimeError as exc:
            return exc
        finally:
            await _stop(batcher, loops)
        return None

    assert "returned 1 results for 2" in str(_run(scenario()))


def test_a_cancelled_callers_items_never_reach_the_handler() -> None:
    async def scenario() -> tuple[list[list[int]], int]:
        batcher = _batcher(max_batch_size=3)
        handler = Recorder()
        handler.release.clear()
        loops = [asyncio.create_task(batcher.run(handler))]
        busy = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher.submit([2, 3]))
        await asyncio.sleep(0.05)
        gone.cancel()
        later = asyncio.create_task(batcher.submit([4, 5]))
        await asyncio.sleep(0.05)
        handler.release.set()
        await asyncio.gather(busy, later)
        depth = batcher.depth
        await _stop(batcher, loops)
        return handler.calls, depth

    calls, depth = _run(scenario())
    assert calls == [[1], [4, 5]], "cancelled items must not take places in a batch"
    assert depth == 0


def test_close_drains_queued_items_then_stops_every_loop() -> None:
    async def scenario() -> tuple[list[int], list[list[int]]]:
        batcher = _batcher(max_batch_size=2)
        handler = Recorder()
        futures = batcher.put([1, 2, 3, 4, 5])
        loops = [asyncio.create_task(batcher.run(handler)) for _ in range(2)]
        batcher.close()
        await asyncio.wait_for(asyncio.gather(*loops), 5)
        return [f.result().value for f in futures], handler.calls

    values, calls = _run(scenario())
    assert values == [2, 4, 6, 8, 10]
    assert sorted(item for call in calls for item in call) == [1, 2, 3, 4, 5]


def test_every_handler_call_is_reported_with_its_key_size_and_duration() -> None:
    seen: list[tuple[Hashable, int, float]] = []

    async def scenario() -> float:
        batcher: Batcher[int, int] = Batcher(
            max_batch_size=8,
            max_batch_wait_s=0.1,
            max_queue_size=16,
            group_key=lambda item: "odd" if item % 2 else "even",
            on_group=lambda key, size, seconds: seen.append((key, size, seconds)),
        )
        batcher.put([1, 2, 3])
        loops = [asyncio.create_task(batcher.run(Recorder()))]
        await asyncio.sleep(0.1)
        await _stop(batcher, loops)
        return batcher.item_seconds

    item_seconds = _run(scenario())
    assert sorted((key, size) for key, size, _ in seen) == [("even", 1), ("odd", 2)]
    assert all(seconds >= 0 for *_, seconds in seen)
    assert item_seconds == 0.0, "each key's first call is reported, not measured"


def test_invalid_sizes_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="batch size"):
        Batcher(max_batch_size=0, max_batch_wait_s=0.0, max_queue_size=1)


def test_batches_are_filled_round_robin_across_lanes() -> None:
    async def scenario() -> list[list[int]]:
        batcher = _batcher(max_batch_size=4, max_queue_size=32)
        handler = Recorder()
        batcher.put([1, 2, 3, 4, 5, 6], lane="heavy")
        batcher.put([100, 101], lane="light")
        loops = [asyncio.create_task(batcher.run(handler))]
        await asyncio.sleep(0.05)
        await _stop(batcher, loops)
        return handler.calls

    assert _run(scenario()) == [[1, 100, 2, 101], [3, 4, 5, 6]]


def test_a_lane_past_its_own_bound_is_refused_while_other_lanes_are_admitted() -> None:
    async def scenario() -> tuple[QueueFullError, int]:
        batcher = _batcher(max_queue_size=16, max_queued_per_lane=3)
        batcher.put([1, 2], lane="a")
        with pytest.raises(QueueFullError) as refused:
            batcher.put([3, 4], lane="a")
        batcher.put([5, 6, 7], lane="b")
        return refused.value, batcher.depth

    refused, depth = _run(scenario())
    assert (refused.scope, refused.depth, refused.limit) == ("lane", 2, 3)
    assert depth == 5


def test_a_cancelled_callers_items_leave_the_queue_at_once() -> None:
    async def scenario() -> tuple[int, int]:
        batcher = _batcher(max_queued_per_lane=2)
        caller = asyncio.create_task(batcher.submit([1, 2], lane="a"))
        await asyncio.sleep(0)
        held = batcher.lane_depth("a")
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        await asyncio.sleep(0)
        batcher.put([3, 4], lane="a")  # its lane has room again, with no worker running
        return held, batcher.depth

    assert _run(scenario()) == (2, 2)


def test_a_lone_request_of_long_jobs_is_never_refused_for_its_own_length() -> None:
    batcher = _batcher(max_wait_s=2.0)
    # Three long jobs of 5 s each: the request lasts 15 s, but nothing is ahead of it (its
    # length is the deadline's business, checked before queueing; a 429 could not help).
    assert batcher.predicted_wait_s(3, lane="a", solo_s=5.0) == 0.0
    assert batcher.admit(3, lane="a", solo_s=5.0) == 0.0


def test_each_workers_first_call_of_a_kind_of_work_is_left_out_of_the_time_per_item() -> None:
    """Two replicas each pay their own first call; and calls whose group keys differ (another
    threshold, say) but whose kind of work is the same are measured after the first."""

    class FirstSlow(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.first = True

        async def __call__(self, items: list[int]) -> list[int]:
            await asyncio.sleep(0.4 if self.first else 0.01)
            self.first = False
            return await super().__call__(items)

    async def scenario() -> tuple[float, float]:
        batcher = Batcher(
            max_batch_size=1,
            max_batch_wait_s=0.0,
            max_queue_size=16,
            group_key=lambda item: item,  # every item its own group
            warm_key=lambda item: "explain",
            item_seconds=0.02,
        )
        loops = [asyncio.create_task(batcher.run(FirstSlow())) for _ in range(2)]
        await asyncio.gather(batcher.submit([1]), batcher.submit([2]))  # one on each loop
        after_first_calls = batcher.item_seconds
        await asyncio.gather(*(batcher.submit([item]) for item in range(3, 9)))
        await _stop(batcher, loops)
        return after_first_calls, batcher.item_seconds

    after_first_calls, warmed = _run(scenario())
    assert after_first_calls == 0.02, "a replica's first call moved the estimate"
    assert 0.005 < warmed < 0.1, "calls of the same kind with other keys were not measured"
