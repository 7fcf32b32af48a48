"""Time as the elector and lease drivers see it, so tests can drive it without sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Protocol, TypeVar

__all__ = ["Clock", "SystemClock", "wait_for"]

T = TypeVar("T")


class Clock(Protocol):
    """What code that measures time needs: wall time, monotonic time and sleep."""

    def now(self) -> datetime:
        """Return the current wall time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Return seconds from an arbitrary origin that never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass; the same call on a ``FakeClock`` just moves it."""
        await asyncio.sleep(max(0.0, seconds))


async def wait_for(clock: Clock, aw: Awaitable[T], timeout_s: float) -> T:
    """Await ``aw`` for at most ``timeout_s`` of ``clock``'s time.

    Like :func:`asyncio.wait_for`, but the deadline follows ``clock`` so a fake clock
    can expire it. Raises :class:`TimeoutError` and cancels ``aw`` when time runs out.
    """
    task = asyncio.ensure_future(aw)
    timer = asyncio.ensure_future(clock.sleep(timeout_s))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        timer.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise TimeoutError(f"no answer within {timeout_s:g}s")
