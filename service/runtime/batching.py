"""Cross-request batching, knowing nothing about models.

A :class:`Batcher` is a bounded queue of items, each with the future its caller awaits. Items
wait in lanes, one per caller (an API key, a client address): a lane holds at most
``max_queued_per_lane`` items and batches are filled round-robin across lanes, so one heavy
caller cannot starve the others. Worker loops (:meth:`Batcher.run`, one per replica, each with
its own handler) take a batch when it is full or its wait budget is spent, split it into groups
of items that may share one call (by ``group_key``), call the handler once per group, and hand
every caller its own result, or the exception that failed its group. A caller that gives up
(cancels) has its queued items dropped at once. The shape follows Ray Serve's
``serve/batching.py``.

Solo items (``solo``: a job of many chunks, Score-CAM or the faithfulness scores) run alone, one
per handler call, and are never taken to fill a batch; while one runs, its handler may lend the
worker to the other items between its chunks (:meth:`Batcher.take_nowait`, :meth:`Batcher.finish`)
and ask whether anyone still waits for it (:meth:`Batcher.waited_for`). Their time is predicted
by ``solo_seconds``, not measured into the time per item, so one long job does not make every
later item look long.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Weight of the newest batch in the decaying average of the time per item.
_EWMA_WEIGHT = 0.2
#: (worker, kind of work) pairs remembered as warmed up; past that many, every call is measured.
_MAX_WARM_KEYS = 4096


class QueueFullError(Exception):
    """The items were refused, none of them queued: they would take the queue (``"queue"``) or
    their caller's lane (``"lane"``) past its bound, or wait longer than the wait bound
    (``"wait"``). ``retry_after_s``: whole seconds after which they would likely be admitted."""

    def __init__(
        self,
        scope: Literal["queue", "lane", "wait"],
        depth: int,
        limit: float,
        retry_after_s: float,
        predicted_wait_s: float,
    ) -> None:
        super().__init__(f"{scope}: {depth} items queued (limit {limit:g})")
        self.scope = scope
        self.depth = depth
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.predicted_wait_s = predicted_wait_s


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One caller's result, with how it was batched."""

    value: R
    batch_size: int  # items in the group it was computed with
    queued_s: float  # from put() to the start of its group's handler call
    compute_s: float  # the handler call's duration


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    lane: Hashable
    future: asyncio.Future[Batched[R]]
    enqueued: float = field(default_factory=time.perf_counter)
    queued: bool = True  # still in its lane (not taken by a worker, not dropped)
    solo: bool = False
    solo_s: float = 0.0  # a solo item's predicted seconds
    started: float = 0.0  # when its handler call began


#: Takes a group's items, returns one result per item, in order: a value, or the exception
#: that item alone failed with. An exception it raises fails the whole group.
Handler = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]
GroupObserver = Callable[[Hashable, int, float], None]


class Batcher(Generic[T, R]):
    """A bounded queue of items with futures, in per-caller lanes, drained in batches.

    ``max_batch_wait_s`` is only spent while :meth:`arriving` says more items are on their way
    (a caller between admission and :meth:`put`, e.g. preprocessing); a lone item goes at once.
    ``on_group(key, size, seconds)`` is told about every handler call, failed ones included.

    Admission (:meth:`admit`, applied by :meth:`put`) is bounded in items (the queue, each lane)
    and, with ``max_wait_s``, in time: items whose predicted wait (:meth:`predicted_wait_s`,
    from the items ahead of them in round-robin order and the measured time per item) is past
    it are refused, so the wait an admitted caller gets does not depend on how fast the
    machine happens to be, and a caller flooding the queue does not get the others refused.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_wait_s: float,
        max_queue_size: int,
        max_queued_per_lane: int | None = None,
        max_wait_s: float | None = None,
        group_key: Callable[[T], Hashable] = lambda item: None,
        on_group: GroupObserver | None = None,
        solo: Callable[[T], bool] = lambda item: False,
        solo_seconds: Callable[[T], float] = lambda item: 0.0,
        slice_s: float = 0.0,
        item_seconds: float = 0.0,
        warm_key: Callable[[T], Hashable] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_batch_wait_s < 0:
            raise ValueError("batch size and queue size must be >= 1, the wait budget >= 0")
        if max_queued_per_lane is not None and max_queued_per_lane < 1:
            raise ValueError("a lane must hold at least one item")
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.max_queue_size = max_queue_size
        self.max_queued_per_lane = max_queued_per_lane or max_queue_size
        self.max_wait_s = max_wait_s
        self._group_key = group_key
        self._on_group = on_group
        self._solo = solo
        self._solo_seconds = solo_seconds
        #: The longest a batch waits for a solo job's chunk to end before it is served.
        self.slice_s = slice_s
        # Lanes with queued items, in round-robin order: a lane served moves to the back.
        self._lanes: OrderedDict[Hashable, deque[_Entry[T, R]]] = OrderedDict()
        self._depth = 0  # items queued, over all lanes
        self._wakeup = asyncio.Event()  # set when items are queued or the batcher closes
        self._closed = False
        self._loops = 0
        self._loop_ids = itertools.count()
        # Worker loop -> (started, items, solo) of the batch it handles now.
        self._batches: dict[int, tuple[float, int, bool]] = {}
        # (worker, kind of work) handled once: the first call of a kind on a worker pays
        # one-time costs (kernels chosen, buffers allocated), so it is not measured into the
        # time per item. The kind (``warm_key``) is coarser than the group key, whose options
        # (a threshold, say) would make every call a first one.
        self._warm: set[tuple[Hashable, Hashable]] = set()
        self._warm_key = warm_key or group_key
        self._working: dict[int, _Entry[T, R]] = {}  # id(item) -> entry, in handler calls
        self._arriving: Counter[Hashable] = Counter()  # items about to be put, by lane
        #: Decaying average of handler-call durations per item, from ``item_seconds`` (a first
        #: estimate: 0, or a time measured at load) on.
        self.item_seconds = item_seconds
        self._measured = False

    @property
    def depth(self) -> int:
        """Items queued and not yet taken by a worker."""
        return self._depth

    def lane_depth(self, lane: Hashable) -> int:
        """Items of ``lane`` queued and not yet taken by a worker."""
        queued = self._lanes.get(lane)
        return len(queued) if queued is not None else 0

    @contextmanager
    def arriving(self, count: int, lane: Hashable = None) -> Iterator[None]:
        """Announce ``count`` items of ``lane`` on their way (being preprocessed, say): a batch
        being filled waits for them, and admission counts them as queued."""
        self._arriving[lane] += count
        try:
            yield
        finally:
            self._arriving[lane] -= count
            if self._arriving[lane] <= 0:
                del self._arriving[lane]

    def predicted_wait_s(self, count: int = 1, lane: Hashable = None, solo_s: float = 0.0) -> float:
        """Seconds the first of ``count`` new items of ``lane`` would wait for a worker.

        The work ahead is that of the others and of the caller's earlier requests, not of this
        request itself: a retry cannot make a request shorter, and its deadline bounds its
        length. So an idle batcher predicts 0 whatever the request, and a lone caller is never
        told to retry. Batches take items round-robin across lanes, so ahead of it are its
        lane's earlier items and, from every other lane, at most as many items as its own
        position; they fill whole batches, each taking the measured time per item times the
        batch size, given in turn to the worker loop free first: a loop is free once what
        remains of its batch is done (its items at the time per item, less the time it has
        run, not a whole batch), or after one slice of the solo job it runs. New solo items
        (``solo_s`` > 0) wait besides for the solo work running and queued.
        """
        pending = Counter(
            {key: sum(not entry.solo for entry in items) for key, items in self._lanes.items()}
        )
        new = 0 if solo_s > 0 else min(count, 1)  # the request's first plain item
        position = pending.get(lane, 0) + self._arriving.get(lane, 0) + new
        pending.update(self._arriving)
        ahead = max(0, position - 1) + sum(
            min(n, position) for key, n in pending.items() if key != lane
        )
        # When each worker loop is next free: what remains of the batch it runs (its items at
        # the measured time per item, less the time it has run), a slice for a solo job's loop.
        now = time.perf_counter()
        free_at = [
            self.slice_s if solo else max(0.0, items * self.item_seconds - (now - started))
            for started, items, solo in self._batches.values()
        ]
        free_at += [0.0] * max(0, max(1, self._loops) - len(free_at))
        heapq.heapify(free_at)
        batch_s = self.max_batch_size * self.item_seconds
        for _ in range(ahead // self.max_batch_size):  # the full batches ahead, on the loop
            heapq.heapreplace(free_at, free_at[0] + batch_s)  # free first
        wait = free_at[0]
        if solo_s > 0:
            return wait + self.solo_backlog_s() / max(1, self._loops)
        return wait

    @property
    def solo_running(self) -> int:
        """Solo jobs in handler calls now."""
        return sum(entry.solo for entry in self._working.values())

    @property
    def solo_queued(self) -> int:
        """Solo jobs queued."""
        return sum(entry.solo for items in self._lanes.values() for entry in items)

    def solo_backlog_s(self) -> float:
        """Predicted seconds of the solo work running (what remains of it) and queued."""
        now = time.perf_counter()
        running = sum(
            max(0.0, entry.solo_s - (now - entry.started))
            for entry in self._working.values()
            if entry.solo
        )
        queued = sum(
            entry.solo_s for items in self._lanes.values() for entry in items if entry.solo
        )
        return running + queued

    def admit(self, count: int, lane: Hashable = None, solo_s: float = 0.0) -> float:
        """Check that ``count`` items of ``lane`` (solo items predicted to take ``solo_s`` each,
        if > 0) may queue now; return their predicted wait.

        Raises :class:`QueueFullError` past the queue's bound, the lane's, or the wait bound.
        """
        wait = self.predicted_wait_s(count, lane, solo_s)
        retry = max(1.0, math.ceil(wait))
        if self._depth + count > self.max_queue_size:
            raise QueueFullError("queue", self._depth, self.max_queue_size, retry, wait)
        held = self.lane_depth(lane)
        if held + count > self.max_queued_per_lane:
            raise QueueFullError("lane", held, self.max_queued_per_lane, retry, wait)
        if self.max_wait_s is not None and wait > self.max_wait_s:
            retry = max(1.0, math.ceil(wait - self.max_wait_s))
            raise QueueFullError("wait", self._depth, self.max_wait_s, retry, wait)
        return wait

    def submit(
        self, items: Sequence[T], lane: Hashable = None
    ) -> Coroutine[object, object, list[Batched[R]]]:
        """Queue ``items`` together in ``lane`` now, or refuse them all now
        (:class:`QueueFullError`); await the returned coroutine for their results, in order.
        Cancelling the awaiting caller drops its items still queued."""
        futures = self.put(items, lane)

        async def results() -> list[Batched[R]]:
            try:
                return list(await asyncio.gather(*futures))
            finally:
                for future in futures:
                    future.cancel()  # no-op when done; drops still-queued items otherwise

        return results()

    def put(self, items: Sequence[T], lane: Hashable = None) -> list[asyncio.Future[Batched[R]]]:
        """Queue ``items`` together in ``lane``, or none of them; one future per item."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        solo = [self._solo(item) for item in items]
        solo_s = [
            self._solo_seconds(item) if is_solo else 0.0
            for item, is_solo in zip(items, solo, strict=True)
        ]
        self.admit(len(items), lane, max(solo_s, default=0.0))
        loop = asyncio.get_running_loop()
        queued = self._lanes.setdefault(lane, deque())
        entries = [
            _Entry[T, R](item, lane, loop.create_future(), solo=is_solo, solo_s=seconds)
            for item, is_solo, seconds in zip(items, solo, solo_s, strict=True)
        ]
        for entry in entries:
            queued.append(entry)
            entry.future.add_done_callback(partial(self._drop, entry))
        self._depth += len(entries)
        self._wakeup.set()
        return [entry.future for entry in entries]

    def close(self) -> None:
        """Let every worker loop stop once the items queued now are handled; refuse new ones."""
        self._closed = True
        self._wakeup.set()

    async def run(self, handler: Handler[T, R]) -> None:
        """A worker loop: take batches and hand them to ``handler`` until :meth:`close`."""
        self._loops += 1
        loop_id = next(self._loop_ids)
        try:
            while (batch := await self._next_batch()) is not None:
                self._batches[loop_id] = (time.perf_counter(), len(batch), batch[0].solo)
                groups: dict[Hashable, list[_Entry[T, R]]] = {}
                for entry in batch:
                    groups.setdefault(self._group_key(entry.item), []).append(entry)
                for key, group in groups.items():
                    await self._handle(handler, key, group, loop_id)
                del self._batches[loop_id]
        finally:
            self._batches.pop(loop_id, None)
            self._loops -= 1

    def _drop(self, entry: _Entry[T, R], _future: object = None) -> None:
        """A queued item whose caller gave up leaves its lane before it costs anything."""
        if not entry.queued:
            return
        queued = self._lanes[entry.lane]
        queued.remove(entry)
        self._unqueue(entry, queued)

    def _unqueue(self, entry: _Entry[T, R], lane: deque[_Entry[T, R]]) -> None:
        entry.queued = False
        self._depth -= 1
        if not lane:
            del self._lanes[entry.lane]

    def _take(self, *, solo: bool = True) -> _Entry[T, R] | None:
        """The next live item, round-robin over lanes (``solo=False``: the next that is not
        solo, solo items staying where they are); None if there is none."""
        while True:
            found = next(
                (
                    (lane, queued, entry)
                    for lane, queued in self._lanes.items()
                    for entry in queued
                    if solo or not entry.solo
                ),
                None,
            )
            if found is None:
                return None
            lane, queued, entry = found
            queued.remove(entry)
            self._unqueue(entry, queued)
            if queued:
                self._lanes.move_to_end(lane)
            if not entry.future.done():  # else its caller gave up a moment ago
                return entry

    async def _next_batch(self) -> list[_Entry[T, R]] | None:
        """Wait for one item, then fill up to the batch size until the budget is spent;
        None once the batcher is closed and drained."""
        while (first := self._take()) is None:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [first]
        if first.solo:
            return batch
        deadline = time.perf_counter() + self.max_batch_wait_s
        while len(batch) < self.max_batch_size:
            entry = self._take(solo=False)
            if entry is None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._arriving or self._closed:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
                continue
            batch.append(entry)
        return batch

    def take_nowait(self) -> list[tuple[Hashable, list[_Entry[T, R]]]]:
        """The groups of one batch of queued items that are not solo, taken now without
        waiting for more (empty when none is queued): for a solo job's handler to run between
        its chunks. Each group is begun; hand each to :meth:`finish` with its results."""
        batch: list[_Entry[T, R]] = []
        while len(batch) < self.max_batch_size and (entry := self._take(solo=False)):
            batch.append(entry)
        groups: dict[Hashable, list[_Entry[T, R]]] = {}
        for entry in batch:
            groups.setdefault(self._group_key(entry.item), []).append(entry)
        for group in groups.values():
            self._begin(group)
        return list(groups.items())

    def waited_for(self, item: T) -> bool:
        """Whether the caller of ``item``, in a handler call now, still waits for it (it has
        not given up, its deadline has not passed). Safe to call from a worker thread."""
        entry = self._working.get(id(item))
        return entry is not None and not entry.future.done()

    def _begin(self, group: list[_Entry[T, R]]) -> float:
        started = time.perf_counter()
        for entry in group:
            entry.started = started
            self._working[id(entry.item)] = entry
        return started

    def finish(
        self,
        key: Hashable,
        group: list[_Entry[T, R]],
        started: float,
        outcome: Sequence[R | BaseException] | BaseException,
        seconds: float | None = None,
        worker: Hashable = None,
    ) -> None:
        """End a begun group: one result per item (a value or its exception), or one exception
        for all; ``seconds`` it computed for (default: since ``started``), on ``worker`` (the
        loop or replica: each pays its own first call of a kind of work)."""
        seconds = time.perf_counter() - started if seconds is None else seconds
        for entry in group:
            self._working.pop(id(entry.item), None)
        warm = (worker, self._warm_key(group[0].item))
        if group[0].solo:
            pass
        elif warm in self._warm or len(self._warm) >= _MAX_WARM_KEYS:
            per_item = seconds / len(group)
            weight = _EWMA_WEIGHT if self._measured else 1.0  # the first measured sets it
            self.item_seconds += weight * (per_item - self.item_seconds)
            self._measured = True
        else:
            self._warm.add(warm)
        if self._on_group is not None:
            self._on_group(key, len(group), seconds)
        if not isinstance(outcome, BaseException) and len(outcome) != len(group):
            outcome = RuntimeError(
                f"batch handler returned {len(outcome)} results for {len(group)}"
            )
        for i, entry in enumerate(group):
            if entry.future.done():
                continue
            value = outcome if isinstance(outcome, BaseException) else outcome[i]
            if isinstance(value, asyncio.CancelledError):
                entry.future.cancel()
            elif isinstance(value, BaseException):
                entry.future.set_exception(value)
            else:
                entry.future.set_result(
                    Batched(value, len(group), started - entry.enqueued, seconds)
                )

    async def _handle(
        self, handler: Handler[T, R], key: Hashable, group: list[_Entry[T, R]], worker: int
    ) -> None:
        group = [entry for entry in group if not entry.future.done()]
        if not group:
            return
        started = self._begin(group)
        try:
            results: Sequence[R | BaseException] | BaseException = await handler(
                [entry.item for entry in group]
            )
        except Exception as exc:
            results = exc
        except BaseException as exc:  # cancelled: the worker loop is stopping
            self.finish(key, group, started, exc, worker=worker)
            raise
        self.finish(key, group, started, results, worker=worker)
