"""``ElectionMachine``: a hypothesis state machine that drives leader electors over a lease.

Three replicas run :class:`~streamspace_sdk.elector.LeaderElector` over one lease while
hypothesis chooses what happens to them: time passes (and jumps past whole leases), a
replica's backend calls hang (a paused process, a stalled network) or fail, replicas stop
and new ones start. After every step it checks the two safety properties fencing rests on:

* at no instant are two electors leaders (``is_leader``) at once;
* every new leader starts at an epoch above every earlier leader's, so the control plane,
  which refuses an epoch lower than the highest it saw, never refuses a rightful leader
  and always refuses a deposed one.

Use it from a driver's tests::

    class FileElection(ElectionMachine):
        def make_lease(self, clock: Clock, key: str) -> Lease:
            return FileLease(FileLease.Settings(lease_file=ROOT / key), clock=clock)


    TestFileElection = FileElection.TestCase
    TestFileElection.settings = hypothesis.settings(max_examples=25, deadline=None)

Drivers without the ``clock`` capability (the backend keeps time) set ``fake_time = False``:
the machine then runs on the real clock with short timings, so keep examples few.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from streamspace_sdk.clock import Clock, SystemClock
from streamspace_sdk.elector import LeaderElector
from streamspace_sdk.errors import LeaseError
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.testing.clock import FakeClock, settle

__all__ = ["ElectionMachine", "FaultyLease"]


class FaultyLease(Lease):
    """Wraps a lease so that one replica's calls can hang (paused) or fail (broken)."""

    name = "faulty"

    def __init__(self, inner: Lease) -> None:
        super().__init__(inner.settings, clock=inner.clock)
        self.inner = inner
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.broken = False
        self.inflight = 0
        """Calls that passed the gate and are with the backend now."""
        self._running = asyncio.Event()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    async def _gate(self) -> None:
        await self._running.wait()
        if self.broken:
            raise LeaseError("the backend is unreachable (injected)")

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        await self._gate()
        self.inflight += 1
        try:
            return await self.inner.try_acquire(holder, duration_s)
        finally:
            self.inflight -= 1

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        await self._gate()
        self.inflight += 1
        try:
            return await self.inner.renew(holder, duration_s)
        finally:
            self.inflight -= 1

    async def _release(self, holder: str) -> None:
        await self._gate()
        self.inflight += 1
        try:
            await self.inner.release(holder)
        finally:
            self.inflight -= 1

    async def _read(self) -> LeaseRecord | None:
        await self._gate()
        self.inflight += 1
        try:
            return await self.inner.read()
        finally:
            self.inflight -= 1

    async def close(self) -> None:
        await self.inner.close()


class _Replica:
    def __init__(self, machine: ElectionMachine, n: int) -> None:
        self.identity = f"replica-{n}-{uuid.uuid4().hex[:6]}"
        self.lease = FaultyLease(machine.make_lease(machine.clock, machine.key))
        self.elector = LeaderElector(
            self.lease,
            self.identity,
            lease_duration_s=machine.lease_duration_s,
            renew_deadline_s=machine.renew_deadline_s,
            retry_period_s=machine.retry_period_s,
            clock=machine.clock,
            on_started_leading=lambda record: machine.started(self.identity, record),
            rng=random.Random(n),
        )
        self.task = asyncio.get_running_loop().create_task(self.elector.run())


class ElectionMachine(RuleBasedStateMachine):
    """Three electors over one lease; subclass it and implement :meth:`make_lease`."""

    fake_time: ClassVar[bool] = True
    """Drive a :class:`FakeClock`; ``False`` for backends that keep their own time."""

    replicas: ClassVar[int] = 3

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.key = uuid.uuid4().hex[:12]
        """A lease name of this run's own, for :meth:`make_lease`."""
        self.clock: Clock
        if self.fake_time:
            self.clock = FakeClock()
            self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = 15.0, 10.0, 2.0
        else:
            self.clock = SystemClock()
            self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = 1.5, 1.0, 0.25
        self.leaderships: list[tuple[str, int]] = []
        self.running: list[_Replica] = []
        self.gone: list[_Replica] = []
        self._made = 0
        self.loop.run_until_complete(self._start(self.replicas))

    def make_lease(self, clock: Clock, key: str) -> Lease:
        """Return a new lease object over the backend for the lease named ``key``."""
        raise NotImplementedError("ElectionMachine subclasses implement make_lease")

    def started(self, identity: str, record: LeaseRecord) -> None:
        """An elector began leading: remember who and at which epoch."""
        self.leaderships.append((identity, record.epoch))

    async def _start(self, count: int) -> None:
        for _ in range(count):
            self._made += 1
            self.running.append(_Replica(self, self._made))
        await self._settle()

    async def _settle(self) -> None:
        """Let every elector act at the current time, backend round trips included: fake
        time stands still while a call that is not paused is with the backend."""
        if not isinstance(self.clock, FakeClock):
            await asyncio.sleep(0.01)
            return
        await settle()
        while any(r.lease.inflight for r in self.running + self.gone):
            await asyncio.sleep(0.001)  # a real backend answers in real time
            await settle()

    def _run(self, seconds: float) -> None:
        async def advance() -> None:
            if isinstance(self.clock, FakeClock):
                # In steps, so every elector gets to act at the times it asked for.
                left = seconds
                while left > 0:
                    step = min(left, 0.5)
                    await self.clock.advance(step)
                    await self._settle()
                    left -= step
            else:
                await asyncio.sleep(seconds)

        self.loop.run_until_complete(advance())

    # -- what happens -----------------------------------------------------------------------

    @rule(fraction=st.floats(min_value=0.05, max_value=2.5))
    def time_passes(self, fraction: float) -> None:
        """Time passes: a bit of a retry period, or past whole leases (a clock jump)."""
        self._run(fraction * (self.retry_period_s if fraction < 1 else self.lease_duration_s))

    @rule(index=st.integers(min_value=0, max_value=9))
    def pause(self, index: int) -> None:
        """A replica's backend calls hang: a paused process or a stalled network."""
        replica = self.running[index % len(self.running)]
        replica.lease.pause()
        self.loop.run_until_complete(self._settle())

    @rule(index=st.integers(min_value=0, max_value=9))
    def resume(self, index: int) -> None:
        """A paused replica goes on; its pending call reaches the backend late."""
        replica = self.running[index % len(self.running)]
        replica.lease.resume()
        self.loop.run_until_complete(self._settle())

    @rule(index=st.integers(min_value=0, max_value=9), broken=st.booleans())
    def backend_fails(self, index: int, broken: bool) -> None:
        """A replica's backend calls fail (or work again)."""
        self.running[index % len(self.running)].lease.broken = broken
        self.loop.run_until_complete(self._settle())

    @precondition(lambda self: len(self.running) > 1)
    @rule(index=st.integers(min_value=0, max_value=9))
    def replica_stops(self, index: int) -> None:
        """A replica shuts down (releasing the lease if it leads), and a new one starts."""
        replica = self.running.pop(index % len(self.running))
        replica.lease.resume()
        replica.lease.broken = False

        async def stop() -> None:
            await replica.elector.stop()
            await self._start(1)

        self.loop.run_until_complete(stop())
        self.gone.append(replica)

    # -- what must hold ---------------------------------------------------------------------

    @invariant()
    def at_most_one_leader(self) -> None:
        leaders = [r.identity for r in self.running if r.elector.is_leader]
        assert len(leaders) <= 1, f"two leaders at once: {leaders}"

    @invariant()
    def epochs_grow_across_leaders(self) -> None:
        for (before, old), (after, new) in zip(
            self.leaderships, self.leaderships[1:], strict=False
        ):
            if after != before:
                assert new > old, f"{after} led at epoch {new} after {before} at {old}"
            else:
                assert new >= old, f"{after} led again at a lower epoch {new} < {old}"

    def teardown(self) -> None:
        async def stop_all() -> None:
            for replica in self.running + self.gone:
                replica.lease.resume()
                replica.lease.broken = False
            for replica in self.running:
                await replica.elector.stop()
            for replica in self.running + self.gone:
                replica.task.cancel()
                await asyncio.gather(replica.task, return_exceptions=True)
                await replica.lease.close()

        try:
            self.loop.run_until_complete(stop_all())
        finally:
            self.loop.close()
