"""The kit's ``ElectionMachine`` over the memory lease: the elector stays safe whatever
hypothesis does to its replicas (pauses, failing backends, clock jumps, restarts)."""

from __future__ import annotations

import pytest
from hypothesis import settings

from streamspace_sdk.clock import Clock
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.leases import MemoryLease, MemoryLeaseStore
from streamspace_sdk.testing import ElectionMachine


class MemoryElection(ElectionMachine):
    def make_lease(self, clock: Clock, key: str) -> Lease:
        store = STORES.setdefault(key, MemoryLeaseStore())
        return MemoryLease(clock=clock, store=store)


STORES: dict[str, MemoryLeaseStore] = {}

TestMemoryElection = MemoryElection.TestCase
TestMemoryElection.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class _FixedEpochLease(MemoryLease):
    """Broken on purpose: every holder gets epoch 1."""

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        record = await super()._try_acquire(holder, duration_s)
        if record is None:
            return None
        self.store.record = record.model_copy(update={"epoch": 1})
        return self.store.record


class _GrabbingLease(MemoryLease):
    """Broken on purpose: takes the lease even while another holds it."""

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        old = self.store.record
        if old is not None and old.holder != holder:
            now = self.clock.now()
            self.store.record = old.model_copy(update={"expires_at": now})
        return await super()._try_acquire(holder, duration_s)


@pytest.mark.parametrize(
    ("broken", "message"),
    [(_FixedEpochLease, "epoch"), (_GrabbingLease, "two leaders at once")],
)
def test_the_machine_catches_a_broken_lease(broken: type[MemoryLease], message: str) -> None:
    """The machine is not vacuous: each safety property fails for a lease that breaks it."""

    class Broken(ElectionMachine):
        def make_lease(self, clock: Clock, key: str) -> Lease:
            return broken(clock=clock, store=STORES.setdefault(key, MemoryLeaseStore()))

    case = Broken.TestCase
    case.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
    with pytest.raises(AssertionError, match=message):
        case("runTest").runTest()
