"""The lease driver contract: an atomic, expiring lock with a fencing epoch.

A driver subclasses :class:`Lease` and implements the underscore methods. Each call is one
atomic step against the backend (a compare-and-swap, a script, a locked file), so that of
any number of contenders at most one holds an unexpired lease at any instant.

The **epoch** is the fencing token: it grows by one at every change of holder, a release
included (client-go's ``leaseTransitions``). A holder renewing its own lease keeps it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime, timedelta
from typing import ClassVar

from pydantic import Field

from streamspace_sdk._models import WireModel
from streamspace_sdk.clock import Clock, SystemClock
from streamspace_sdk.errors import LeaseError
from streamspace_sdk.settings import StreamSpaceSettings

__all__ = ["Lease", "LeaseRecord"]


class LeaseRecord(WireModel):
    """A lease as the backend stores it. Times are UTC."""

    holder: str
    """Identity of the holder; empty after a release."""
    epoch: int = Field(ge=0)
    """Fencing token: grows by one at every change of holder."""
    acquired_at: datetime
    """When the current holder acquired it."""
    renewed_at: datetime
    """When it was last renewed (or acquired)."""
    expires_at: datetime
    """When it lapses unless renewed."""

    def is_held(self, now: datetime) -> bool:
        """Return whether someone holds it at ``now``."""
        return bool(self.holder) and now < self.expires_at

    def held_by(self, holder: str, now: datetime) -> bool:
        """Return whether ``holder`` holds it at ``now``."""
        return self.holder == holder and self.is_held(now)


class Lease(ABC):
    """A leader lease. Subclass it and register it in ``streamspace.leases``.

    Capabilities: ``exclusive`` (at most one holder: every real backend; not ``none``),
    ``clock`` (expiry follows the injected :class:`~streamspace_sdk.clock.Clock`, so tests can
    drive it; backends whose server keeps time, like Redis, leave it out).
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset({"exclusive"})

    class Settings(StreamSpaceSettings):
        """The driver's own settings, read from the environment when it is built."""

    def __init__(
        self, settings: StreamSpaceSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.clock: Clock = clock if clock is not None else SystemClock()

    async def try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        """Take the lease if it is free, expired or already ours; renew it if ours.

        Returns:
            The record now stored, held by ``holder``; ``None`` when another holds it.
        """
        self._check(holder, duration_s)
        record = await self._try_acquire(holder, duration_s)
        if record is not None and record.holder != holder:
            raise LeaseError(f"{self.name} lease driver returned a record of {record.holder!r}")
        return record

    async def renew(self, holder: str, duration_s: float) -> LeaseRecord:
        """Extend the lease ``holder`` holds by ``duration_s`` from now.

        Raises:
            LeaseLost: someone else holds it now, or it was released.
        """
        self._check(holder, duration_s)
        return await self._renew(holder, duration_s)

    async def release(self, holder: str) -> None:
        """Give the lease up at once if ``holder`` holds it; otherwise do nothing."""
        self._check(holder, 1.0)
        await self._release(holder)

    async def read(self) -> LeaseRecord | None:
        """Return the stored record, or ``None`` if the lease was never taken."""
        return await self._read()

    async def close(self) -> None:
        """Release clients and files (not the lease)."""

    def expiry(self, duration_s: float) -> tuple[datetime, datetime]:
        """Return ``(now, now + duration_s)`` by this lease's clock."""
        now = self.clock.now()
        return now, now + timedelta(seconds=duration_s)

    @staticmethod
    def _check(holder: str, duration_s: float) -> None:
        if not holder:
            raise ValueError("a lease holder identity must not be empty")
        if not duration_s > 0:
            raise ValueError(f"a lease duration must be positive, got {duration_s!r}")

    @abstractmethod
    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        """Atomically acquire or renew; ``None`` when another holds it unexpired."""

    @abstractmethod
    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        """Atomically renew if ``holder`` still holds it, else raise ``LeaseLost``."""

    @abstractmethod
    async def _release(self, holder: str) -> None:
        """Atomically clear the holder if it is ``holder``, keeping the epoch."""

    @abstractmethod
    async def _read(self) -> LeaseRecord | None:
        """Return the stored record."""
