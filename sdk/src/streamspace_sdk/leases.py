"""The lease drivers built into the SDK: ``memory`` and ``none``."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from streamspace_sdk.clock import Clock
from streamspace_sdk.errors import LeaseLost
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.settings import StreamSpaceSettings

__all__ = ["MemoryLease", "MemoryLeaseStore", "NoLease"]


class MemoryLeaseStore:
    """The shared state behind :class:`MemoryLease` objects of one process."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.lock = asyncio.Lock()


class MemoryLease(Lease):
    """A lease held in this process's memory: replicas are tasks, not processes.

    For tests and for single-process agents. Instances built with the same ``LEASE_KEY``
    share one record, as processes sharing a backend would.
    """

    name = "memory"
    capabilities = frozenset({"exclusive", "clock"})

    class Settings(StreamSpaceSettings):
        """Settings of the memory lease."""

        lease_key: str = "default"
        """Which in-process lease to contend for."""

    _stores: ClassVar[dict[str, MemoryLeaseStore]] = {}

    def __init__(
        self,
        settings: StreamSpaceSettings | None = None,
        *,
        clock: Clock | None = None,
        store: MemoryLeaseStore | None = None,
    ) -> None:
        super().__init__(settings, clock=clock)
        key = getattr(self.settings, "lease_key", "default")
        self.store = (
            store if store is not None else self._stores.setdefault(key, MemoryLeaseStore())
        )

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        async with self.store.lock:
            now, expires = self.expiry(duration_s)
            old = self.store.record
            if old is not None and old.is_held(now) and old.holder != holder:
                return None
            same = old is not None and old.holder == holder
            record = LeaseRecord(
                holder=holder,
                epoch=1 if old is None else old.epoch if same else old.epoch + 1,
                acquired_at=old.acquired_at if old is not None and same else now,
                renewed_at=now,
                expires_at=expires,
            )
            self.store.record = record
            return record

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        async with self.store.lock:
            now, expires = self.expiry(duration_s)
            old = self.store.record
            if old is None or old.holder != holder:
                raise LeaseLost(f"{holder!r} no longer holds the memory lease")
            record = old.model_copy(update={"renewed_at": now, "expires_at": expires})
            self.store.record = record
            return record

    async def _release(self, holder: str) -> None:
        async with self.store.lock:
            old = self.store.record
            if old is not None and old.holder == holder:
                now = self.clock.now()
                self.store.record = old.model_copy(
                    update={"holder": "", "renewed_at": now, "expires_at": now}
                )

    async def _read(self) -> LeaseRecord | None:
        return self.store.record


class NoLease(Lease):
    """No election: every caller holds it, always at epoch 0. What ``ENABLE_HA=false`` uses.

    Not ``exclusive``, so it is not run through ``LeaseConformance``; a second agent with the
    same id is then resolved by the control plane (the newer connection supersedes).
    """

    name = "none"
    capabilities = frozenset({"clock"})

    def __init__(
        self, settings: StreamSpaceSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        super().__init__(settings, clock=clock)
        self._record: LeaseRecord | None = None

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord:
        return await self._renew(holder, duration_s)

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        now, expires = self.expiry(duration_s)
        acquired = self._record.acquired_at if self._record else now
        self._record = LeaseRecord(
            holder=holder, epoch=0, acquired_at=acquired, renewed_at=now, expires_at=expires
        )
        return self._record

    async def _release(self, holder: str) -> None:
        self._record = None

    async def _read(self) -> LeaseRecord | None:
        return self._record
