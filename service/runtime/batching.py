"""Cross-request batching, knowing nothing about models.

A :class:`Batcher` is a bounded queue of items, each with the future its caller awaits. Worker
loops (:meth:`Batcher.run`, one per replica, each with its own handler) take a batch when it is
full or its wait budget is spent, split it into groups of items that may share one call (by
``group_key``), call the handler once per group, and hand every caller its own result, or the
exception that failed its group. Callers that gave up (cancelled futures) are dropped before
their items cost anything. The shape follows Ray Serve's ``serve/batching.py``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Weight of the newest batch in the decaying average of batch durations.
_EWMA_WEIGHT = 0.2


class QueueFullError(Exception):
    """The items would take the queue past its bound; none of them were queued."""

    def __init__(self, depth: int, limit: int, retry_after_s: float) -> None:
        super().__init__(f"{depth} items queued (limit {limit})")
        self.depth = depth
        self.limit = limit
        self.retry_after_s = retry_after_s


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
    future: asyncio.Future[Batched[R]]
    enqueued: float = field(default_factory=time.perf_counter)


Handler = Callable[[list[T]], Awaitable[Sequence[R]]]
GroupObserver = Callable[[Hashable, int, float], None]


class Batcher(Generic[T, R]):
    """A bounded queue of items with futures, drained in batches by worker loops.

    ``max_batch_wait_s`` is only spent while :attr:`arriving` says more items are on their way
    (a caller between admission and :meth:`put`, e.g. preprocessing); a lone item goes at once.
    ``on_group(key, size, seconds)`` is told about every handler call, failed ones included.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_wait_s: float,
        max_queue_size: int,
        group_key: Callable[[T], Hashable] = lambda item: None,
        on_group: GroupObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_batch_wait_s < 0:
            raise ValueError("batch size and queue size must be >= 1, the wait budget >= 0")
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.max_queue_size = max_queue_size
        self._group_key = group_key
        self._on_group = on_group
        self._queue: asyncio.Queue[_Entry[T, R] | None] = asyncio.Queue()
        self._depth = 0  # live items waiting; the asyncio queue is unbounded, we bound it here
        self._loops = 0
        self.arriving = 0  # callers about to put items (they make a batch worth waiting for)
        self.batch_seconds = 0.0  # decaying average of handler-call durations

    @property
    def depth(self) -> int:
        """Items queued and not yet taken by a worker."""
        return self._depth

    def retry_after_s(self, extra: int = 0) -> float:
        """Whole seconds until the queue, plus ``extra`` items, should have drained (>= 1)."""
        batches = math.ceil((self._depth + extra) / self.max_batch_size)
        return max(1.0, math.ceil(batches * self.batch_seconds / max(1, self._loops)))

    async def submit(self, items: Sequence[T]) -> list[Batched[R]]:
        """Queue ``items`` together, or refuse them all (:class:`QueueFullError`); await their
        results in order. Cancelling the caller drops the items still queued."""
        futures = self.put(items)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()  # no-op when done; drops still-queued items otherwise

    def put(self, items: Sequence[T]) -> list[asyncio.Future[Batched[R]]]:
        """Queue ``items`` together, or none of them; one future per item."""
        if self._depth + len(items) > self.max_queue_size:
            raise QueueFullError(self._depth, self.max_queue_size, self.retry_after_s(len(items)))
        loop = asyncio.get_running_loop()
        entries = [_Entry[T, R](item, loop.create_future()) for item in items]
        for entry in entries:
            self._queue.put_nowait(entry)
        self._depth += len(entries)
        return [entry.future for entry in entries]

    def close(self, loops: int) -> None:
        """Ask ``loops`` worker loops to stop once every item queued before now is handled."""
        for _ in range(loops):
            self._queue.put_nowait(None)

    async def run(self, handler: Handler[T, R]) -> None:
        """A worker loop: take batches and hand them to ``handler`` until :meth:`close`."""
        self._loops += 1
        try:
            while (batch := await self._next_batch()) is not None:
                self._depth -= len(batch)
                groups: dict[Hashable, list[_Entry[T, R]]] = {}
                for entry in batch:
                    groups.setdefault(self._group_key(entry.item), []).append(entry)
                for key, group in groups.items():
                    await self._handle(handler, key, group)
        finally:
            self._loops -= 1

    async def _next_batch(self) -> list[_Entry[T, R]] | None:
        """Block for one live item, then fill up to the batch size until the budget is spent."""
        first = await self._take(block=True)
        if first is None:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.max_batch_wait_s
        while len(batch) < self.max_batch_size:
            entry = await self._take(block=False, deadline=deadline)
            if entry is None:
                break
            batch.append(entry)
        return batch

    async def _take(self, *, block: bool, deadline: float = 0.0) -> _Entry[T, R] | None:
        """The next live entry; None on a stop signal (handed on) or, unblocked, when the
        queue is empty and nothing is arriving before ``deadline``."""
        while True:
            try:
                entry = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if block:
                    entry = await self._queue.get()
                else:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or self.arriving == 0:
                        return None
                    try:
                        entry = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        return None
            if entry is None:
                if not block:
                    self._queue.put_nowait(None)  # stop once this batch is done
                return None
            if entry.future.done():  # its caller gave up: drop it before it costs compute
                self._depth -= 1
                continue
            return entry

    async def _handle(
        self, handler: Handler[T, R], key: Hashable, group: list[_Entry[T, R]]
    ) -> None:
        group = [entry for entry in group if not entry.future.done()]
        if not group:
            return
        started = time.perf_counter()
        try:
            results = await handler([entry.item for entry in group])
            if len(results) != len(group):
                raise RuntimeError(
                    f"batch handler returned {len(results)} results for {len(group)}"
                )
        except Exception as exc:
            for entry in group:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        finally:
            seconds = time.perf_counter() - started
            self.batch_seconds += _EWMA_WEIGHT * (seconds - self.batch_seconds)
            if self._on_group is not None:
                self._on_group(key, len(group), seconds)
        for entry, value in zip(group, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(
                    Batched(value, len(group), started - entry.enqueued, seconds)
                )
