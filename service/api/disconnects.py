"""Dropping the work of a client that went away while its request waited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar("T")

#: How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1


class ClientDisconnectedError(Exception):
    """The client went away while its request waited; its work was cancelled."""


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and dropping its queued items) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnectedError
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(_consume)
