"""``LeaseConformance``: what every lease driver must do."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
import pytest_asyncio

from streamspace_sdk.clock import Clock, SystemClock
from streamspace_sdk.errors import LeaseLost
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.testing.base import BaseConformance
from streamspace_sdk.testing.clock import AdvancingClock, FakeClock

__all__ = ["LeaseConformance", "LeaseFactory"]

LeaseFactory = Callable[[Clock], Lease]
"""Builds a new lease object, as a new process would, on the same backend each call."""


class LeaseConformance(BaseConformance):
    """Tests for a lease driver. Subclass it and provide a ``lease_factory`` fixture.

    ``lease_factory(clock)`` returns a new :class:`Lease` object contending for the **same**
    lease on the same backend every time it is called (fresh objects stand for separate
    processes). With the ``clock`` capability the suite drives time with a
    :class:`FakeClock` and never sleeps; without it, override ``lease_duration_s`` with a
    short duration the backend can honour (the default is 2 s of real time).
    """

    @pytest.fixture
    def lease_factory(self) -> LeaseFactory:
        """Return the factory under test. Required: override it in your test class."""
        pytest.fail(
            "LeaseConformance needs a `lease_factory` fixture returning a callable "
            "(clock) -> Lease on one shared backend"
        )

    @pytest.fixture
    def lease_capabilities(self, lease_factory: LeaseFactory) -> frozenset[str]:
        """The driver's capabilities; by default its class's ``capabilities``."""
        return type(lease_factory(SystemClock())).capabilities

    @pytest.fixture
    def lease_clock(self, lease_capabilities: frozenset[str]) -> FakeClock | SystemClock:
        """A fake clock when the driver honours an injected clock, else the real one."""
        return FakeClock() if "clock" in lease_capabilities else SystemClock()

    @pytest.fixture
    def lease_duration_s(self, lease_clock: FakeClock | SystemClock) -> float:
        """Lease duration used by the suite: 15 s of fake time, or 2 s of real time."""
        return 15.0 if isinstance(lease_clock, FakeClock) else 2.0

    @pytest_asyncio.fixture
    async def make_lease(
        self, lease_factory: LeaseFactory, lease_clock: Clock
    ) -> AsyncIterator[Callable[[], Lease]]:
        """Build lease objects that are closed when the test ends."""
        made: list[Lease] = []

        def make() -> Lease:
            lease = lease_factory(lease_clock)
            made.append(lease)
            return lease

        yield make
        for lease in made:
            await lease.close()

    # -- acquire and read ------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_acquire_free_lease(
        self, make_lease: Callable[[], Lease], lease_clock: Clock, lease_duration_s: float
    ) -> None:
        """Contract: a free lease is granted, and the record names the holder and expiry.

        Troubleshooting: ``_try_acquire`` must create the record when none exists and return
        it; ``expires_at`` is ``renewed_at + duration``, from the injected clock.
        """
        lease = make_lease()
        record = await lease.try_acquire("a", lease_duration_s)
        assert record is not None, "a lease nobody holds must be granted"
        assert record.holder == "a"
        assert record.epoch >= 1
        assert record.held_by("a", lease_clock.now())
        _assert_close(record.expires_at - record.renewed_at, lease_duration_s)
        read = await make_lease().read()
        assert read is not None
        assert read.holder == "a"
        assert read.epoch == record.epoch

    @pytest.mark.asyncio
    async def test_holder_reacquire_keeps_epoch(
        self, make_lease: Callable[[], Lease], lease_duration_s: float
    ) -> None:
        """Contract: acquiring a lease you already hold renews it; the epoch stays.

        Troubleshooting: compare the stored holder with the caller before bumping the epoch.
        """
        lease = make_lease()
        first = await lease.try_acquire("a", lease_duration_s)
        again = await lease.try_acquire("a", lease_duration_s)
        assert first is not None
        assert again is not None
        assert again.epoch == first.epoch

    @pytest.mark.asyncio
    async def test_no_takeover_before_expiry(
        self, make_lease: Callable[[], Lease], lease_clock: AdvancingClock, lease_duration_s: float
    ) -> None:
        """Contract: while the holder's lease is unexpired, nobody else gets it.

        Troubleshooting: ``_try_acquire`` must refuse when another holder's ``expires_at`` is
        still in the future, by the backend's clock.
        """
        a, b = make_lease(), make_lease()
        assert await a.try_acquire("a", lease_duration_s) is not None
        assert await b.try_acquire("b", lease_duration_s) is None
        await lease_clock.advance(lease_duration_s * 0.5)
        assert await b.try_acquire("b", lease_duration_s) is None
        record = await b.read()
        assert record is not None
        assert record.holder == "a"

    @pytest.mark.asyncio
    async def test_takeover_after_expiry(
        self, make_lease: Callable[[], Lease], lease_clock: AdvancingClock, lease_duration_s: float
    ) -> None:
        """Contract: once a lease expires unrenewed, another holder gets it at a higher epoch.

        Troubleshooting: treat an expired record as free, and bump the epoch on the change
        of holder.
        """
        a, b = make_lease(), make_lease()
        first = await a.try_acquire("a", lease_duration_s)
        await lease_clock.advance(lease_duration_s * 1.1)
        second = await b.try_acquire("b", lease_duration_s)
        assert first is not None, "an expired lease must be granted"
        assert second is not None, "an expired lease must be granted"
        assert second.epoch > first.epoch

    @pytest.mark.asyncio
    async def test_renew_extends(
        self, make_lease: Callable[[], Lease], lease_clock: AdvancingClock, lease_duration_s: float
    ) -> None:
        """Contract: renewing pushes the expiry ``duration`` past now; the epoch stays.

        Troubleshooting: ``_renew`` must write ``expires_at = now + duration``.
        """
        a, b = make_lease(), make_lease()
        first = await a.try_acquire("a", lease_duration_s)
        await lease_clock.advance(lease_duration_s * 0.6)
        renewed = await a.renew("a", lease_duration_s)
        assert first is not None
        assert renewed.expires_at > first.expires_at
        assert renewed.epoch == first.epoch
        await lease_clock.advance(lease_duration_s * 0.6)
        assert await b.try_acquire("b", lease_duration_s) is None, "renewal must extend"

    @pytest.mark.asyncio
    async def test_release_lets_another_acquire_at_once(
        self, make_lease: Callable[[], Lease], lease_duration_s: float
    ) -> None:
        """Contract: after release, another holder acquires at once, at a higher epoch.

        Troubleshooting: ``_release`` must clear the holder (keeping the epoch) so the
        record reads as free without waiting for expiry.
        """
        a, b = make_lease(), make_lease()
        first = await a.try_acquire("a", lease_duration_s)
        await a.release("a")
        second = await b.try_acquire("b", lease_duration_s)
        assert first is not None, "a released lease must be free"
        assert second is not None, "a released lease must be free"
        assert second.epoch > first.epoch

    @pytest.mark.asyncio
    async def test_release_by_other_is_ignored(
        self, make_lease: Callable[[], Lease], lease_duration_s: float
    ) -> None:
        """Contract: only the holder can release; anyone else's release changes nothing.

        Troubleshooting: ``_release`` must compare the stored holder with the caller.
        """
        a, b = make_lease(), make_lease()
        await a.try_acquire("a", lease_duration_s)
        await b.release("b")
        assert await b.try_acquire("b", lease_duration_s) is None
        record = await b.read()
        assert record is not None
        assert record.holder == "a"

    @pytest.mark.asyncio
    async def test_lost_holder_cannot_renew(
        self, make_lease: Callable[[], Lease], lease_clock: AdvancingClock, lease_duration_s: float
    ) -> None:
        """Contract: a holder whose lease was taken over gets ``LeaseLost`` on renew.

        Troubleshooting: ``_renew`` must check the stored holder in the same atomic step
        that writes the new expiry (a CAS, a script, a locked file).
        """
        a, b = make_lease(), make_lease()
        await a.try_acquire("a", lease_duration_s)
        await lease_clock.advance(lease_duration_s * 1.1)
        assert await b.try_acquire("b", lease_duration_s) is not None
        with pytest.raises(LeaseLost):
            await a.renew("a", lease_duration_s)
        assert await a.try_acquire("a", lease_duration_s) is None

    @pytest.mark.asyncio
    async def test_bad_arguments_are_refused(
        self, make_lease: Callable[[], Lease], lease_duration_s: float
    ) -> None:
        """Contract: an empty holder or a non-positive duration is a ``ValueError``.

        Troubleshooting: call the base class's public methods; they check arguments.
        """
        lease = make_lease()
        with pytest.raises(ValueError, match="holder"):
            await lease.try_acquire("", lease_duration_s)
        with pytest.raises(ValueError, match="duration"):
            await lease.try_acquire("a", 0)

    @pytest.mark.asyncio
    async def test_epoch_grows_across_holders(
        self, make_lease: Callable[[], Lease], lease_clock: AdvancingClock, lease_duration_s: float
    ) -> None:
        """Contract: the epoch strictly grows at every change of holder, by release or expiry.

        Troubleshooting: the epoch is the fencing token; it must never be reset, even when
        a record is rewritten after a release or repaired.
        """
        leases = [make_lease() for _ in range(3)]
        epochs: list[int] = []
        for i in range(6):
            holder = f"h{i % 3}"
            record = await leases[i % 3].try_acquire(holder, lease_duration_s)
            assert record is not None
            epochs.append(record.epoch)
            if i % 2:
                await leases[i % 3].release(holder)
            else:
                await lease_clock.advance(lease_duration_s * 1.1)
        assert epochs == sorted(set(epochs)), f"epochs must strictly grow: {epochs}"

    @pytest.mark.asyncio
    async def test_one_holder_among_concurrent_contenders(
        self, make_lease: Callable[[], Lease], lease_clock: AdvancingClock, lease_duration_s: float
    ) -> None:
        """Contract: of N contenders trying at once, over many rounds, at most one holds an
        unexpired lease at any instant, and the epoch grows at every change of holder.

        Troubleshooting: two winners in one round mean the read-check-write in
        ``_try_acquire`` is not atomic: do it in one backend operation (SET NX, a CAS on a
        resource version, a script, an exclusive file lock).
        """
        rng = random.Random(1234)
        contenders = 5
        rounds = 40 if isinstance(lease_clock, FakeClock) else 8
        leases = [make_lease() for _ in range(contenders)]
        holding: dict[int, LeaseRecord] = {}
        last_epoch, last_holder = 0, ""
        for round_no in range(rounds):
            results = await asyncio.gather(
                *(lease.try_acquire(f"c{i}", lease_duration_s) for i, lease in enumerate(leases))
            )
            for i, record in enumerate(results):
                if record is not None:
                    holding[i] = record
            now = lease_clock.now()
            live = {i: r for i, r in holding.items() if r.held_by(f"c{i}", now)}
            assert len(live) <= 1, f"round {round_no}: {sorted(live)} hold the lease at once"
            assert live, f"round {round_no}: a free or expired lease was granted to nobody"
            ((winner, record),) = live.items()
            if record.holder != last_holder:
                assert record.epoch > last_epoch, f"round {round_no}: epoch did not grow"
            last_epoch, last_holder = record.epoch, record.holder
            move = rng.choice(["release", "expire", "renew", "wait"])
            if move == "release":
                await leases[winner].release(f"c{winner}")
                del holding[winner]
            elif move == "expire":
                await lease_clock.advance(lease_duration_s * 1.05)
            elif move == "renew":
                holding[winner] = await leases[winner].renew(f"c{winner}", lease_duration_s)
            else:
                await lease_clock.advance(lease_duration_s * 0.3)


def _assert_close(delta: timedelta, seconds: float) -> None:
    assert abs(delta.total_seconds() - seconds) < 0.5, f"{delta} is not about {seconds}s"
