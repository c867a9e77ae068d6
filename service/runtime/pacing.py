"""Long jobs in slices: what a forward pass costs on a replica, and the checkpoint that stops a
job nobody waits for and lends its worker to the other callers between its chunks.

Score-CAM's masked passes and the faithfulness scores' perturbed inputs run for seconds or
minutes. The engine runs them in chunks and calls a checkpoint before each
(:data:`~service.engine.cam.costs.Checkpoint`); :class:`Slicer` is the runtime's:

- it raises :class:`~service.engine.cam.costs.WorkAbandoned` once no caller waits for the job
  (the client went away, the deadline passed), so the job stops within one chunk;
- it runs one batch of the other callers' queued work (predicts, gradient explains) in the
  replica's own thread, so they wait at most about one chunk, never the whole job;
- it measures each chunk, so :class:`Pace` knows the seconds per forward pass and per ROAD solve
  on this replica's device: chunks are sized to ``work_slice_ms`` from them, and admission
  predicts a job's seconds from its declared :class:`~service.engine.cam.costs.Cost`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.engine.cam.costs import Cost, WorkAbandoned

#: Weight of the newest chunk in the decaying averages.
_EWMA_WEIGHT = 0.3
#: Seconds of one ROAD solve before any is measured (README: 20-110 ms a mask on one thread).
_SOLVE_S_GUESS = 0.1
#: How long a worker thread waits for the event loop to hand it another caller's batch.
_HANDOFF_TIMEOUT_S = 5.0


@dataclass
class Pace:
    """Measured seconds per forward pass (an image through the model, in a chunk of others)
    and per ROAD solve on one model's replicas. ``None``: not measured yet."""

    pass_s: float | None = None
    solve_s: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, chunk: Cost, seconds: float) -> None:
        """A chunk of ``chunk``'s work took ``seconds``."""
        with self._lock:
            if chunk.forward_passes:
                self.pass_s = _ewma(self.pass_s, seconds / chunk.forward_passes)
            elif chunk.cpu_solves:
                self.solve_s = _ewma(self.solve_s, seconds / chunk.cpu_solves)

    def seconds(self, cost: Cost, images: int) -> float:
        """Predicted seconds of ``images`` images' forward passes and ``cost`` on top (a
        backward pass counted as two forward passes); 0 while nothing is measured."""
        passes = images + cost.forward_passes + 2 * cost.backward_passes
        solve_s = self.solve_s if self.solve_s is not None else _SOLVE_S_GUESS
        return passes * (self.pass_s or 0.0) + cost.cpu_solves * solve_s

    def chunk(self, slice_s: float, most: int) -> int:
        """Perturbed inputs per forward pass for chunks of about ``slice_s``, at most
        ``most`` (the configured batch), at least 1."""
        if not self.pass_s:
            return most
        return max(1, min(most, int(slice_s / self.pass_s)))


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA_WEIGHT * (new - old)


#: A group of another caller's work lent a long job's worker: its items, and what files its
#: results back (called on the event loop with the results and the seconds they took).
Lent = tuple[list[Any], Callable[[Any, float], None]]


class Slicer:
    """The checkpoint of one long job, called in the replica's thread before each chunk."""

    def __init__(
        self,
        *,
        pace: Pace,
        wanted: Callable[[], bool],
        loop: asyncio.AbstractEventLoop,
        take_others: Callable[[], Sequence[Lent]],
        run_others: Callable[[list[Any]], Any],
    ) -> None:
        self._pace = pace
        self._wanted = wanted
        self._loop = loop
        self._take_others = take_others
        self._run_others = run_others
        self._chunk: Cost | None = None
        self._chunk_started = 0.0
        self.chunks = 0  # chunks started
        self.lent_s = 0.0  # seconds the job's worker spent on other callers' work

    def __call__(self, chunk: Cost) -> None:
        now = time.perf_counter()
        if self._chunk is not None:
            self._pace.observe(self._chunk, now - self._chunk_started)
            self._chunk = None
        if not self._wanted():
            raise WorkAbandoned
        self._serve_others()
        if not self._wanted():  # its deadline may have passed meanwhile
            raise WorkAbandoned
        self.chunks += 1
        self._chunk = chunk
        self._chunk_started = time.perf_counter()

    def _serve_others(self) -> None:
        """One batch of the other callers' work, run here, its results filed on the loop."""
        started = time.perf_counter()
        handoff = asyncio.run_coroutine_threadsafe(_call(self._take_others), self._loop)
        try:
            groups = handoff.result(_HANDOFF_TIMEOUT_S)
        except TimeoutError:  # the loop is stopping or stuck: keep to our own work
            handoff.cancel()
            return
        for items, file_results in groups:
            group_started = time.perf_counter()
            results = self._run_others(items)
            seconds = time.perf_counter() - group_started
            self._loop.call_soon_threadsafe(file_results, results, seconds)
        self.lent_s += time.perf_counter() - started


async def _call(fn: Callable[[], Sequence[Lent]]) -> Sequence[Lent]:
    return fn()
