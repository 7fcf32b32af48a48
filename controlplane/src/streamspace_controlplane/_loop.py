"""A background loop that runs a pass when kicked and at least every interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

__all__ = ["KickLoop"]

logger = logging.getLogger("streamspace.controlplane")


class KickLoop(ABC):
    """Run :meth:`_pass` on every :meth:`kick` and every ``interval_s`` seconds, one at a time.

    Kicks that arrive during a pass coalesce into one more pass after it. A pass that raises
    is logged and the loop goes on: the next kick or tick retries, since every pass reads
    what is true from the store rather than remembering what it did.
    """

    def __init__(self, name: str, interval_s: float) -> None:
        self._name = name
        self.interval_s = interval_s
        """Seconds between passes when nobody kicks."""
        self._kicked = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        """Ask for a pass as soon as possible; never blocks."""
        self._kicked.set()

    async def start(self) -> None:
        """Start the loop's task; the first pass runs at once."""
        if self._task is None:
            self._kicked.set()
            self._task = asyncio.create_task(self._loop(), name=f"streamspace-{self._name}")

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> None:
        """Run one pass now (waiting for a running one to finish first)."""
        async with self._lock:
            await self._pass()

    @abstractmethod
    async def _pass(self) -> None:
        """Do the work of one pass."""

    async def _loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the event is set, and stop() would then wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._kicked.wait()
            self._kicked.clear()
            try:
                async with self._lock:
                    await self._pass()
            except Exception:
                logger.exception("%s pass failed; retrying in %.3gs", self._name, self.interval_s)
