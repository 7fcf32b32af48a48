"""A background loop that runs a pass when kicked and at least every interval, and how a
retried failure is logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

from streamspace_sdk.errors import StreamSpaceError

__all__ = ["FailureLog", "KickLoop"]

logger = logging.getLogger("streamspace.controlplane")


class FailureLog:
    """Log a failure that is retried once while it lasts, not on every retry.

    A known error (a :class:`StreamSpaceError`, such as the store being unreachable) is one
    WARNING line per distinct message, without a traceback: it says what is wrong. Anything
    else is a bug and keeps its traceback every time. When it works again, one INFO line.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._known: str | None = None

    def failed(self, exc: Exception, retry: str) -> None:
        """Log ``exc``; ``retry`` says when it is tried again (``retrying in 1s``)."""
        if not isinstance(exc, StreamSpaceError):
            logger.error("%s failed; %s", self.what, retry, exc_info=exc)
            return
        message = str(exc)
        if message != self._known:
            logger.warning("%s failed: %s; %s", self.what, message, retry)
            self._known = message

    def worked(self) -> None:
        """Note a success; after a logged known failure, say it works again."""
        if self._known is not None:
            logger.info("%s works again", self.what)
            self._known = None


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
        self._failures = FailureLog(f"The {name} pass")

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
            except Exception as exc:
                self._failures.failed(exc, f"retrying in {self.interval_s:.3g}s")
            else:
                self._failures.worked()
