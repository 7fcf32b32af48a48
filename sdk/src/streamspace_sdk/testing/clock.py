"""A clock that moves only when a test says so."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Protocol

from streamspace_sdk.clock import Clock

__all__ = ["AdvancingClock", "FakeClock", "settle"]

_START = datetime(2026, 1, 1, tzinfo=UTC)


class AdvancingClock(Clock, Protocol):
    """A clock a test can move: ``FakeClock`` jumps, ``SystemClock`` really waits."""

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of this clock's time pass."""
        ...


class FakeClock:
    """A :class:`~streamspace_sdk.clock.Clock` whose time moves only in :meth:`advance`.

    ``sleep`` parks the caller until the clock has been advanced past its deadline, so code
    that waits 15 s of lease time runs in microseconds. ``advance`` wakes sleepers in deadline
    order and lets the event loop run after each wake-up, so what they do next (a renew, a
    new sleep) happens at the time it would have happened.
    """

    def __init__(self, start: datetime = _START) -> None:
        self._start = start
        self._t = 0.0
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._t)

    def monotonic(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._t + seconds, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper whose deadline passes."""
        if seconds < 0:
            raise ValueError("time does not go back")
        target = self._t + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._t = max(self._t, deadline)
            if not fut.done():
                fut.set_result(None)
            await settle()
        self._t = target
        await settle()

    @property
    def sleepers(self) -> int:
        """How many tasks wait on this clock now."""
        return sum(1 for _, _, f in self._sleepers if not f.done())


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until none is left ready (bounded by ``rounds``)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
