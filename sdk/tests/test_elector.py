"""Tests of :class:`streamspace_sdk.elector.LeaderElector`, driven by a fake clock.

Every elector contends for a :class:`MemoryLease` on one shared store, and time moves only
when a test advances the :class:`FakeClock`, so no test sleeps and every instant is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import pytest
import pytest_asyncio

from streamspace_sdk.clock import Clock
from streamspace_sdk.elector import LeaderElector
from streamspace_sdk.errors import ConfigError, LeaseError, LeaseLost
from streamspace_sdk.lease import LeaseRecord
from streamspace_sdk.leases import MemoryLease, MemoryLeaseStore
from streamspace_sdk.settings import AgentSettings
from streamspace_sdk.testing.clock import FakeClock, settle

LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0
MAX_RETRY = RETRY_PERIOD * 1.2
"""The longest a follower waits between two attempts (one jittered retry period)."""
STEP = 0.25
"""A power of two, so fake times add up exactly."""
TIMES = "\N{MULTIPLICATION SIGN}"


class FreezableLease(MemoryLease):
    """A memory lease whose backend can be cut off: while frozen, every call hangs.

    A frozen call waits on an event that only :meth:`thaw` sets, as a call to a backend on the
    far side of a network partition would; never thawed, it never answers.
    """

    def __init__(self, *, clock: Clock, store: MemoryLeaseStore) -> None:
        super().__init__(clock=clock, store=store)
        self._reachable = asyncio.Event()
        self._reachable.set()

    def freeze(self) -> None:
        self._reachable.clear()

    def thaw(self) -> None:
        self._reachable.set()

    @property
    def frozen(self) -> bool:
        return not self._reachable.is_set()

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        await self._reachable.wait()
        return await super()._try_acquire(holder, duration_s)

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        await self._reachable.wait()
        return await super()._renew(holder, duration_s)

    async def _release(self, holder: str) -> None:
        await self._reachable.wait()
        await super()._release(holder)

    async def _read(self) -> LeaseRecord | None:
        await self._reachable.wait()
        return await super()._read()


class FlakyLease(MemoryLease):
    """A memory lease that fails as a backend that is down would.

    Its first calls of each kind raise the errors given, and every call raises while the
    clock is inside ``down`` (a ``(from, until)`` pair of monotonic seconds).
    """

    def __init__(
        self,
        *,
        clock: FakeClock,
        store: MemoryLeaseStore,
        acquire_errors: list[Exception] | None = None,
        renew_errors: list[Exception] | None = None,
        down: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        super().__init__(clock=clock, store=store)
        self.fake_clock = clock
        self.acquire_errors = list(acquire_errors or [])
        self.renew_errors = list(renew_errors or [])
        self.down = down
        self.acquire_calls = 0

    def _fail_if_down(self) -> None:
        if self.down[0] <= self.fake_clock.monotonic() < self.down[1]:
            raise LeaseError("the backend is down")

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        self.acquire_calls += 1
        self._fail_if_down()
        if self.acquire_errors:
            raise self.acquire_errors.pop(0)
        return await super()._try_acquire(holder, duration_s)

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        self._fail_if_down()
        if self.renew_errors:
            raise self.renew_errors.pop(0)
        return await super()._renew(holder, duration_s)


class Recorder:
    """Sync callbacks that note what they were called with, and at what fake time."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.started: list[tuple[float, int]] = []
        self.stopped: list[float] = []
        self.new_leaders: list[str] = []

    def on_started_leading(self, record: LeaseRecord) -> None:
        self.started.append((self.clock.monotonic(), record.epoch))

    def on_stopped_leading(self) -> None:
        self.stopped.append(self.clock.monotonic())

    def on_new_leader(self, holder: str) -> None:
        self.new_leaders.append(holder)


class Harness:
    """Electors on one store and one fake clock, whose tasks are all ended at test end."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryLeaseStore()
        self.electors: list[LeaderElector] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.recorders: dict[str, Recorder] = {}
        self._seeds = random.Random(1234)

    def lease(self) -> FreezableLease:
        return FreezableLease(clock=self.clock, store=self.store)

    def elector(
        self,
        identity: str,
        *,
        lease: MemoryLease | None = None,
        release_on_stop: bool = True,
        on_started_leading: Callable[[LeaseRecord], Awaitable[None] | None] | None = None,
        on_stopped_leading: Callable[[], Awaitable[None] | None] | None = None,
        on_new_leader: Callable[[str], Awaitable[None] | None] | None = None,
    ) -> LeaderElector:
        """Build an elector with the default timings; callbacks default to a Recorder's."""
        recorder = self.recorders[identity] = Recorder(self.clock)
        elector = LeaderElector(
            lease if lease is not None else self.lease(),
            identity,
            lease_duration_s=LEASE_DURATION,
            renew_deadline_s=RENEW_DEADLINE,
            retry_period_s=RETRY_PERIOD,
            on_started_leading=on_started_leading or recorder.on_started_leading,
            on_stopped_leading=on_stopped_leading or recorder.on_stopped_leading,
            on_new_leader=on_new_leader or recorder.on_new_leader,
            release_on_stop=release_on_stop,
            rng=random.Random(self._seeds.random()),
        )
        self.electors.append(elector)
        return elector

    async def start(self, *electors: LeaderElector) -> None:
        for elector in electors:
            self.tasks[elector.identity] = asyncio.create_task(
                elector.run(), name=f"elector-{elector.identity}"
            )
        await settle()

    def leaders(self) -> list[LeaderElector]:
        return [e for e in self.electors if e.is_leader]

    async def advance(self, seconds: float) -> None:
        """Advance in steps, checking at every step that there is at most one leader."""
        for _ in range(round(seconds / STEP)):
            await self.clock.advance(STEP)
            assert len(self.leaders()) <= 1

    async def advance_until(self, condition: Callable[[], bool], *, within: float) -> float:
        """Advance step by step until ``condition()``; return how long that took."""
        start = self.clock.monotonic()
        while not condition():
            assert self.clock.monotonic() - start < within, "condition not met in time"
            await self.clock.advance(STEP)
            assert len(self.leaders()) <= 1
        return self.clock.monotonic() - start

    async def close(self) -> None:
        for elector in self.electors:
            if isinstance(elector.lease, FreezableLease):
                elector.lease.thaw()
        await asyncio.gather(*(e.stop() for e in self.electors))
        for task in self.tasks.values():
            if not task.cancelled():
                await task  # re-raises anything run() raised
        assert all(t.done() for t in self.tasks.values())


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="streamspace.elector")
    return caplog


# -- configuration -------------------------------------------------------------------------


def test_client_go_defaults_are_valid() -> None:
    elector = LeaderElector(MemoryLease(store=MemoryLeaseStore()), "replica-a")
    assert (elector.lease_duration_s, elector.renew_deadline_s, elector.retry_period_s) == (
        15.0,
        10.0,
        2.0,
    )
    assert elector.release_on_stop
    assert not elector.is_leader
    assert elector.leader is None
    assert elector.record is None
    assert elector.epoch is None


@pytest.mark.parametrize(
    ("lease_duration", "renew_deadline", "retry_period", "message"),
    [
        (10, 10, 2, "LEASE_DURATION (10s) must be greater than RENEW_DEADLINE (10s)"),
        (5, 10, 2, "LEASE_DURATION (5s) must be greater than RENEW_DEADLINE (10s)"),
        (15, 2, 2, f"RENEW_DEADLINE (2s) must be greater than 1.2 {TIMES} RETRY_PERIOD (2s)"),
        (15, 2.4, 2, f"RENEW_DEADLINE (2.4s) must be greater than 1.2 {TIMES} RETRY_PERIOD (2s)"),
        (0, 10, 2, "LEASE_DURATION (0) must be a positive"),
        (15, -1, 2, "RENEW_DEADLINE (-1) must be a positive"),
        (15, 10, 0, "RETRY_PERIOD (0) must be a positive"),
        (15, 10, math.nan, "RETRY_PERIOD (nan) must be a positive"),
        (math.inf, 10, 2, "LEASE_DURATION (inf) must be a positive"),
    ],
)
def test_bad_timings_fail_naming_the_variables(
    lease_duration: float, renew_deadline: float, retry_period: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        LeaderElector(
            MemoryLease(store=MemoryLeaseStore()),
            "replica-a",
            lease_duration_s=lease_duration,
            renew_deadline_s=renew_deadline,
            retry_period_s=retry_period,
        )


def test_every_timing_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        LeaderElector(
            MemoryLease(store=MemoryLeaseStore()),
            "replica-a",
            lease_duration_s=10,
            renew_deadline_s=10,
            retry_period_s=10,
        )
    assert "LEASE_DURATION (10s) must be greater than RENEW_DEADLINE (10s)" in str(info.value)
    assert "RENEW_DEADLINE (10s) must be greater than 1.2" in str(info.value)


@pytest.mark.parametrize(
    ("lease_duration", "renew_deadline", "retry_period"),
    [(15, 10, 2), (10.5, 10, 2), (15, 2.5, 2), (60, 40, 5), (0.3, 0.2, 0.1)],
)
def test_good_timings_are_accepted(
    lease_duration: float, renew_deadline: float, retry_period: float
) -> None:
    LeaderElector(
        MemoryLease(store=MemoryLeaseStore()),
        "replica-a",
        lease_duration_s=lease_duration,
        renew_deadline_s=renew_deadline,
        retry_period_s=retry_period,
    )


def test_identity_must_not_be_empty() -> None:
    with pytest.raises(ConfigError, match="identity must not be empty"):
        LeaderElector(MemoryLease(store=MemoryLeaseStore()), "")


def test_from_settings_takes_the_three_timings() -> None:
    settings = AgentSettings(
        agent_id="k8s-prod",
        control_plane_url="wss://cp.example",
        lease_duration=30.0,
        renew_deadline=20.0,
        retry_period=5.0,
    )
    calls: list[str] = []
    elector = LeaderElector.from_settings(
        MemoryLease(store=MemoryLeaseStore()), "pod-1", settings, on_new_leader=calls.append
    )
    assert (elector.lease_duration_s, elector.renew_deadline_s, elector.retry_period_s) == (
        30.0,
        20.0,
        5.0,
    )
    assert elector.identity == "pod-1"


def test_from_settings_rejects_bad_timings() -> None:
    settings = AgentSettings(
        agent_id="k8s-prod",
        control_plane_url="wss://cp.example",
        lease_duration=10.0,
        renew_deadline=10.0,
        retry_period=2.0,
    )
    with pytest.raises(ConfigError, match=r"LEASE_DURATION \(10s\).*RENEW_DEADLINE \(10s\)"):
        LeaderElector.from_settings(MemoryLease(store=MemoryLeaseStore()), "pod-1", settings)


# -- electing ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_one_of_three_leads_and_the_others_follow(
    harness: Harness, logs: pytest.LogCaptureFixture
) -> None:
    a, b, c = (harness.elector(name) for name in ("a", "b", "c"))
    await harness.start(a, b, c)

    assert harness.leaders() == [a]  # the first to try takes the free lease
    assert a.fencing_token() == a.epoch == 1
    assert a.record is not None
    assert a.record.holder == "a"
    await a.wait_leading()
    for elector in (a, b, c):
        assert elector.leader == "a"
        assert harness.recorders[elector.identity].new_leaders == ["a"]
    for follower in (b, c):
        assert follower.epoch is None
        assert follower.record is None
        with pytest.raises(LeaseLost):
            follower.fencing_token()
    assert harness.recorders["a"].started == [(0.0, 1)]
    assert harness.recorders["b"].started == harness.recorders["c"].started == []

    messages = [r.getMessage() for r in logs.records]
    assert messages.count("Attempting to acquire leader lease") == 3
    assert any(m.startswith("Successfully acquired leader lease") for m in messages)
    assert messages.count("This agent is the LEADER") == 1
    assert messages.count("This agent is a FOLLOWER (leader: a)") == 2


@pytest.mark.asyncio
async def test_leader_keeps_leading_across_many_renew_periods(harness: Harness) -> None:
    a, b, c = (harness.elector(name) for name in ("a", "b", "c"))
    await harness.start(a, b, c)

    for _ in range(round(60 / STEP)):  # thirty renew periods
        await harness.clock.advance(STEP)
        assert harness.leaders() == [a]
        record = harness.store.record
        assert record is not None
        assert record.held_by("a", harness.clock.now())
        assert record.expires_at - harness.clock.now() > timedelta(
            seconds=LEASE_DURATION - RETRY_PERIOD - STEP
        )
    assert a.epoch == 1
    assert harness.recorders["a"].started == [(0.0, 1)]
    assert harness.recorders["a"].stopped == []
    assert harness.recorders["b"].new_leaders == harness.recorders["c"].new_leaders == ["a"]


@pytest.mark.asyncio
async def test_stop_releases_and_a_follower_takes_over_within_one_retry_period(
    harness: Harness,
) -> None:
    a, b, c = (harness.elector(name) for name in ("a", "b", "c"))
    await harness.start(a, b, c)
    await harness.advance(5)

    await a.stop()

    assert harness.tasks["a"].done()
    assert not a.is_leader
    assert harness.recorders["a"].stopped == [5.0]
    record = harness.store.record
    assert record is not None
    assert record.holder == ""  # released, not left to expire
    took = await harness.advance_until(lambda: bool(harness.leaders()), within=MAX_RETRY + STEP)
    assert took <= MAX_RETRY
    (new,) = harness.leaders()
    assert new in (b, c)
    assert new.fencing_token() == 2
    other = c if new is b else b
    await harness.advance(MAX_RETRY)  # the other follower's next attempt sees the new leader
    assert harness.recorders[other.identity].new_leaders == ["a", new.identity]
    assert other.leader == new.identity
    await harness.advance(10)
    assert harness.leaders() == [new]


@pytest.mark.asyncio
async def test_a_hung_renew_stops_leading_at_the_renew_deadline_before_expiry(
    harness: Harness,
) -> None:
    a = harness.elector("a")
    await harness.start(a)
    b = harness.elector("b")
    await harness.start(b)
    await harness.advance(5)  # renewed at 2 s and at 4 s
    assert isinstance(a.lease, FreezableLease)
    a.lease.freeze()  # the renew at 6 s never answers

    while harness.clock.monotonic() < 14.0:  # last good renew (4 s) + RENEW_DEADLINE
        assert a.is_leader
        assert a.fencing_token() == 1
        await harness.clock.advance(STEP)
    assert harness.clock.monotonic() == 14.0
    assert not a.is_leader
    with pytest.raises(LeaseLost):
        a.fencing_token()
    assert harness.recorders["a"].stopped == [14.0]
    record = harness.store.record
    assert record is not None
    assert record.held_by("a", harness.clock.now())  # not expired: that happens at 19 s
    assert record.expires_at == harness.clock.now() + timedelta(seconds=5)

    # b may take over only once the lease has expired, at 19 s.
    took = await harness.advance_until(lambda: b.is_leader, within=5 + MAX_RETRY + STEP)
    assert 19.0 <= harness.clock.monotonic() <= 19.0 + MAX_RETRY
    assert took >= 5.0
    assert b.fencing_token() == 2
    assert not a.is_leader


class PeekClock:
    """A clock that can show a later monotonic time than the fake clock wakes sleepers at."""

    def __init__(self, inner: FakeClock) -> None:
        self.inner = inner
        self.ahead = 0.0

    def now(self) -> datetime:
        return self.inner.now()

    def monotonic(self) -> float:
        return self.inner.monotonic() + self.ahead

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@pytest.mark.asyncio
async def test_is_leader_follows_the_clock_even_before_the_loop_notices(
    harness: Harness,
) -> None:
    peek = PeekClock(harness.clock)
    lease = FreezableLease(clock=harness.clock, store=harness.store)
    recorder = Recorder(harness.clock)
    a = LeaderElector(
        lease,
        "a",
        clock=peek,
        on_stopped_leading=recorder.on_stopped_leading,
    )
    harness.electors.append(a)
    await harness.start(a)
    await harness.advance(1)
    lease.freeze()
    await harness.advance(8)  # 9 s: the renew at 2 s hangs; its deadline is 10 s
    assert harness.leaders() == [a]

    peek.ahead = 1.0  # the clock reads 10 s, but no sleeper has been woken
    assert not a.is_leader
    with pytest.raises(LeaseLost):
        a.fencing_token()
    assert recorder.stopped == []  # the loop has not noticed yet

    peek.ahead = 0.0
    await harness.clock.advance(1)
    assert not a.is_leader
    assert recorder.stopped == [10.0]


@pytest.mark.asyncio
async def test_a_crashed_leader_is_replaced_only_after_its_lease_expires(
    harness: Harness,
) -> None:
    a = harness.elector("a", release_on_stop=False)
    await harness.start(a)
    b, c = harness.elector("b"), harness.elector("c")
    await harness.start(b, c)
    await harness.advance(5)  # last renew at 4 s: the lease expires at 19 s

    harness.tasks["a"].cancel()  # the process dies without releasing
    await settle()
    assert harness.tasks["a"].cancelled()
    assert not a.is_leader
    assert harness.recorders["a"].stopped == [5.0]
    record = harness.store.record
    assert record is not None
    assert record.holder == "a"

    await harness.advance(13.75)
    assert harness.leaders() == []
    await harness.advance_until(lambda: bool(harness.leaders()), within=0.25 + MAX_RETRY + STEP)
    assert 19.0 <= harness.clock.monotonic() <= 19.0 + MAX_RETRY
    (new,) = harness.leaders()
    assert new.fencing_token() == 2


@pytest.mark.asyncio
async def test_cancelling_run_releases_when_release_on_stop(harness: Harness) -> None:
    a, b = harness.elector("a"), harness.elector("b")
    await harness.start(a, b)
    harness.tasks["a"].cancel()
    await settle()
    assert harness.tasks["a"].cancelled()
    assert harness.recorders["a"].stopped == [0.0]
    record = harness.store.record
    assert record is not None
    assert record.holder == ""
    await harness.advance_until(lambda: b.is_leader, within=MAX_RETRY + STEP)


@pytest.mark.asyncio
async def test_lease_lost_steps_down_at_once(harness: Harness) -> None:
    a, b = harness.elector("a"), harness.elector("b")
    await harness.start(a, b)
    await harness.advance(3)  # renewed at 2 s

    now = harness.clock.now()
    harness.store.record = LeaseRecord(  # someone force-writes the backend
        holder="intruder",
        epoch=2,
        acquired_at=now,
        renewed_at=now,
        expires_at=now + timedelta(seconds=60),
    )
    assert harness.leaders() == [a]  # nothing tells a until its next renew, at 4 s
    await harness.advance(1)

    assert not a.is_leader
    assert harness.recorders["a"].stopped == [4.0]  # not at the 12 s renew deadline
    assert a.leader == "intruder"
    assert harness.recorders["a"].new_leaders == ["a", "intruder"]
    assert not harness.tasks["a"].done()  # a follower again, not gone
    await harness.advance(MAX_RETRY)
    assert harness.recorders["b"].new_leaders == ["a", "intruder"]
    assert harness.leaders() == []


@pytest.mark.asyncio
async def test_a_failing_backend_is_retried_until_the_lease_is_acquired(
    harness: Harness, logs: pytest.LogCaptureFixture
) -> None:
    lease = FlakyLease(
        clock=harness.clock,
        store=harness.store,
        acquire_errors=[LeaseError("redis down"), OSError("refused"), RuntimeError("bug")],
    )
    a = harness.elector("a", lease=lease)
    await harness.start(a)
    assert not a.is_leader

    await harness.advance_until(lambda: a.is_leader, within=3 * MAX_RETRY + STEP)
    assert lease.acquire_calls == 4
    assert not harness.tasks["a"].done()
    assert a.fencing_token() == 1
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("Could not acquire leader lease" in w for w in warnings)
    assert "redis down" in warnings[0]


@pytest.mark.asyncio
async def test_renew_errors_are_retried_until_the_deadline(harness: Harness) -> None:
    lease = FlakyLease(
        clock=harness.clock,
        store=harness.store,
        renew_errors=[LeaseError("timeout"), OSError("reset"), LeaseError("timeout")],
    )
    a = harness.elector("a", lease=lease)
    await harness.start(a)
    # Renews fail at 2, 4 and 6 s and work at 8 s, within the 10 s deadline.
    for _ in range(round(20 / STEP)):
        await harness.clock.advance(STEP)
        assert a.is_leader
    assert harness.recorders["a"].stopped == []
    assert a.epoch == 1


@pytest.mark.asyncio
async def test_renew_errors_past_the_deadline_make_a_follower_again(harness: Harness) -> None:
    lease = FlakyLease(clock=harness.clock, store=harness.store, down=(1.0, 12.0))
    a = harness.elector("a", lease=lease)
    await harness.start(a)
    await harness.advance(9.75)  # renews fail at 2, 4, 6 and 8 s
    assert harness.leaders() == [a]
    await harness.advance(STEP)  # and the deadline passes at 10 s
    assert not a.is_leader
    assert harness.recorders["a"].stopped == [10.0]
    assert not harness.tasks["a"].done()
    # The backend is back at 12 s, and the lease (expiring at 15 s) is still a's: a takes
    # it up again at its next attempt. Nobody else held it, so the epoch stays the same.
    await harness.advance(1.75)
    assert not a.is_leader
    await harness.advance_until(lambda: a.is_leader, within=MAX_RETRY + STEP)
    assert a.fencing_token() == 1
    assert [epoch for _, epoch in harness.recorders["a"].started] == [1, 1]


# -- callbacks -----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_callbacks_may_be_sync_or_async(harness: Harness, kind: str) -> None:
    calls: list[str] = []

    def sync_started(record: LeaseRecord) -> None:
        calls.append(f"started:{record.epoch}")

    def sync_stopped() -> None:
        calls.append("stopped")

    def sync_new(holder: str) -> None:
        calls.append(f"new:{holder}")

    async def async_started(record: LeaseRecord) -> None:
        await asyncio.sleep(0)
        calls.append(f"started:{record.epoch}")

    async def async_stopped() -> None:
        await asyncio.sleep(0)
        calls.append("stopped")

    async def async_new(holder: str) -> None:
        await asyncio.sleep(0)
        calls.append(f"new:{holder}")

    if kind == "sync":
        a = harness.elector(
            "a",
            on_started_leading=sync_started,
            on_stopped_leading=sync_stopped,
            on_new_leader=sync_new,
        )
    else:
        a = harness.elector(
            "a",
            on_started_leading=async_started,
            on_stopped_leading=async_stopped,
            on_new_leader=async_new,
        )
    await harness.start(a)
    await a.wait_leading()
    await harness.advance(4)
    await a.stop()
    assert calls == ["new:a", "started:1", "stopped"]


@pytest.mark.asyncio
async def test_raising_callbacks_do_not_kill_the_loop(
    harness: Harness, logs: pytest.LogCaptureFixture
) -> None:
    def bad_new(holder: str) -> None:
        raise ValueError(f"new {holder}")

    async def bad_started(record: LeaseRecord) -> None:
        raise ValueError("started")

    def bad_stopped() -> None:
        raise ValueError("stopped")

    a = harness.elector(
        "a", on_new_leader=bad_new, on_started_leading=bad_started, on_stopped_leading=bad_stopped
    )
    b = harness.elector("b", on_new_leader=bad_new)
    await harness.start(a, b)
    await harness.advance(30)
    assert harness.leaders() == [a]
    assert not harness.tasks["a"].done()
    assert not harness.tasks["b"].done()

    await a.stop()  # on_stopped_leading raises, and the lease is released all the same
    await harness.tasks["a"]
    record = harness.store.record
    assert record is not None
    assert record.holder == ""
    await harness.advance_until(lambda: b.is_leader, within=MAX_RETRY + STEP)
    failures = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR]
    assert any("on_new_leader" in m for m in failures)
    assert any("on_started_leading" in m for m in failures)
    assert any("on_stopped_leading" in m for m in failures)


@pytest.mark.asyncio
async def test_long_on_started_leading_runs_beside_renewals_and_is_cancelled(
    harness: Harness,
) -> None:
    order: list[str] = []
    forever = asyncio.Event()

    async def lead(record: LeaseRecord) -> None:
        order.append("leading")
        try:
            await forever.wait()
        finally:
            order.append("cancelled")

    a = harness.elector(
        "a", on_started_leading=lead, on_stopped_leading=lambda: order.append("stopped")
    )
    await harness.start(a)
    await harness.advance(40)  # twenty renewals while the leader's work runs
    assert a.is_leader
    assert order == ["leading"]
    await a.stop()
    assert order == ["leading", "cancelled", "stopped"]


@pytest.mark.asyncio
async def test_stop_from_inside_a_callback(harness: Harness) -> None:
    """A callback may stop its own elector, from the loop or from the leader's task."""
    electors: dict[str, LeaderElector] = {}

    async def stop_in_new_leader(holder: str) -> None:  # awaited in b's loop
        await electors["b"].stop()

    async def stop_in_started_leading(record: LeaseRecord) -> None:  # a task of its own
        await electors["a"].stop()

    electors["a"] = a = harness.elector("a", on_started_leading=stop_in_started_leading)
    electors["b"] = b = harness.elector("b", on_new_leader=stop_in_new_leader)
    await harness.start(a, b)
    assert harness.tasks["a"].done()
    assert harness.tasks["b"].done()
    assert harness.recorders["a"].stopped == [0.0]
    assert harness.leaders() == []


# -- stopping ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stop_before_run_and_twice_is_fine(harness: Harness) -> None:
    a = harness.elector("a")
    await a.stop()
    await a.stop()
    await a.run()  # returns at once: a stopped elector does not run
    assert not a.is_leader
    assert harness.store.record is None
    with pytest.raises(LeaseLost, match="stopped before it led"):
        await a.wait_leading()

    b = harness.elector("b")
    await harness.start(b)
    await b.stop()
    await b.stop()
    assert harness.recorders["b"].stopped == [0.0]
    assert harness.tasks["b"].done()


@pytest.mark.asyncio
async def test_run_twice_at_once_is_refused(harness: Harness) -> None:
    a = harness.elector("a")
    await harness.start(a)
    with pytest.raises(RuntimeError, match="already running"):
        await a.run()


@pytest.mark.asyncio
async def test_stop_wakes_a_follower_waiting_to_lead(harness: Harness) -> None:
    a, b = harness.elector("a"), harness.elector("b")
    await harness.start(a, b)
    waiter = asyncio.create_task(b.wait_leading())
    await settle()
    assert not waiter.done()
    await b.stop()
    with pytest.raises(LeaseLost):
        await waiter


@pytest.mark.asyncio
async def test_stop_interrupts_a_hung_backend_call(harness: Harness) -> None:
    a = harness.elector("a")
    await harness.start(a)
    b = harness.elector("b")
    assert isinstance(b.lease, FreezableLease)
    b.lease.freeze()
    await harness.start(b)  # b's first try_acquire hangs
    await b.stop()
    assert harness.tasks["b"].done()


# -- safety under chaos --------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(5))
async def test_never_two_leaders_and_epochs_grow_under_chaos(harness: Harness, seed: int) -> None:
    """Crash, stop, partition and restart replicas at random.

    At every fake instant at most one elector is leader, a leader's lease is truly held by it
    in the store, and each new holder's epoch is greater than the last one's.
    """
    rng = random.Random(seed)
    terms: list[tuple[str, int]] = []
    violations: list[str] = []
    generation = 0

    def spawn() -> LeaderElector:
        nonlocal generation
        generation += 1
        identity = f"replica-{generation}"
        holder: list[LeaderElector] = []

        def started(record: LeaseRecord) -> None:
            others = [e.identity for e in harness.leaders() if e is not holder[0]]
            if others:
                violations.append(f"{identity} started leading while {others} lead")
            terms.append((identity, record.epoch))

        elector = harness.elector(
            identity, release_on_stop=rng.random() < 0.7, on_started_leading=started
        )
        holder.append(elector)
        return elector

    def check() -> None:
        leaders = harness.leaders()
        assert len(leaders) <= 1, [e.identity for e in leaders]
        for elector in leaders:
            record = harness.store.record
            assert record is not None
            assert record.held_by(elector.identity, harness.clock.now())
            assert record.epoch == elector.fencing_token()

    def pick(candidates: list[LeaderElector]) -> LeaderElector:
        """Pick the leader more often than not: that is where the danger is."""
        leading = [e for e in candidates if e.is_leader]
        return leading[0] if leading and rng.random() < 0.6 else rng.choice(candidates)

    live = [spawn() for _ in range(rng.randint(3, 5))]
    await harness.start(*live)
    for _ in range(40):
        op = rng.choice(["advance", "advance", "freeze", "thaw", "stop", "kill", "spawn"])
        frozen = [e for e in live if isinstance(e.lease, FreezableLease) and e.lease.frozen]
        if op == "freeze" and live:
            victim = pick(live)
            assert isinstance(victim.lease, FreezableLease)
            victim.lease.freeze()
        elif op == "thaw" and frozen:
            victim = rng.choice(frozen)
            assert isinstance(victim.lease, FreezableLease)
            victim.lease.thaw()
        elif op == "stop" and len(live) > len(frozen):
            victim = pick([e for e in live if e not in frozen])
            await victim.stop()
            live.remove(victim)
        elif op == "kill" and live:
            victim = pick(live)
            harness.tasks[victim.identity].cancel()
            live.remove(victim)
        if op == "spawn" or len(live) < 2:
            new = spawn()
            live.append(new)
            await harness.start(new)
        check()
        for _ in range(rng.randint(1, 24)):
            await harness.clock.advance(STEP)
            check()

    # Liveness: once the partitions heal, someone leads again.
    for elector in live:
        assert isinstance(elector.lease, FreezableLease)
        elector.lease.thaw()
    await harness.advance_until(
        lambda: bool(harness.leaders()), within=LEASE_DURATION + 2 * MAX_RETRY
    )

    assert violations == []
    assert len({identity for identity, _ in terms}) >= 2, "the chaos never moved the lease"
    for (before, old_epoch), (after, new_epoch) in itertools.pairwise(terms):
        if after == before:
            assert new_epoch >= old_epoch  # a leader retaking its own lease keeps its epoch
        else:
            assert new_epoch > old_epoch, f"{after}: epoch {new_epoch} after {before}'s {old_epoch}"
