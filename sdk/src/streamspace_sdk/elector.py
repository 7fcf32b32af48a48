"""Leader election over any :class:`~streamspace_sdk.lease.Lease`, with client-go's semantics.

An HA agent runs one :class:`LeaderElector` per replica. All replicas contend for one lease;
the one that holds it is the **leader** and is the only one that dials the control plane.
The rules follow Kubernetes client-go's ``leaderelection`` package:

* ``LEASE_DURATION``: how long a lease stays valid without renewal. Followers take it over
  only once it has expired (or been released).
* ``RENEW_DEADLINE``: how long a leader keeps trying to renew before it stops acting. It is
  shorter than ``LEASE_DURATION``, so a leader that cannot reach the backend stops acting
  *before* its lease expires and before anyone else can take it over.
* ``RETRY_PERIOD``: the pause between attempts, with up to 20 % jitter for followers.

The elector adds one thing client-go leaves to the caller: :attr:`LeaderElector.is_leader`
is computed from the clock at every read, so it turns false the instant the renew deadline
passes, even while a renew call is still hanging and the loop has not noticed yet. That, and
the lease's epoch (:meth:`LeaderElector.fencing_token`), is what fences a deposed leader.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Self, TypeVar

from streamspace_sdk.clock import Clock, wait_for
from streamspace_sdk.errors import ConfigError, LeaseLost
from streamspace_sdk.hooks import maybe_await
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.settings import AgentSettings

__all__ = ["LeaderElector"]

logger = logging.getLogger("streamspace.elector")

T = TypeVar("T")

_JITTER_FACTOR = 1.2
"""client-go's ``JitterFactor``: a follower waits up to this many retry periods between
attempts, so a renew deadline must be longer than that for a leader to get one retry in."""


class _Stopping(Exception):
    """Raised inside the loop when :meth:`LeaderElector.stop` interrupts a wait."""


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _check_config(
    identity: str, lease_duration_s: float, renew_deadline_s: float, retry_period_s: float
) -> None:
    """Raise :class:`ConfigError` naming the variables when the timings cannot work."""
    problems: list[str] = []
    timings = {
        "LEASE_DURATION": lease_duration_s,
        "RENEW_DEADLINE": renew_deadline_s,
        "RETRY_PERIOD": retry_period_s,
    }
    for var, value in timings.items():
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{var} ({value!r}) must be a positive, finite number of seconds")
    if not problems:
        if not lease_duration_s > renew_deadline_s:
            problems.append(
                f"LEASE_DURATION ({_seconds(lease_duration_s)}) must be greater than "
                f"RENEW_DEADLINE ({_seconds(renew_deadline_s)})"
            )
        if not renew_deadline_s > _JITTER_FACTOR * retry_period_s:
            problems.append(
                f"RENEW_DEADLINE ({_seconds(renew_deadline_s)}) must be greater than "
                f"{_JITTER_FACTOR:g} × RETRY_PERIOD ({_seconds(retry_period_s)})"  # noqa: RUF001
            )
    if not identity:
        problems.append("the leader election identity must not be empty")
    if problems:
        raise ConfigError("; ".join(problems))


class LeaderElector:
    """Elect one leader among the replicas that share a lease, and keep it elected.

    Contract:

    * :meth:`run` loops until :meth:`stop`. As a **follower** it calls
      :meth:`Lease.try_acquire <streamspace_sdk.lease.Lease.try_acquire>` every retry period
      (jittered by up to 20 %), and reports each new holder it observes to ``on_new_leader``.
      Backend errors are logged and retried; they never end the loop.
    * Once it holds the lease it is the **leader**: it calls ``on_started_leading(record)``
      and then renews every retry period. A failed renew (an error, a timeout) is retried
      until ``last successful renew + renew_deadline``; if that passes, or the backend says
      someone else holds the lease (:class:`~streamspace_sdk.errors.LeaseLost`), the elector
      stops leading at once, calls ``on_stopped_leading`` and becomes a follower again.
    * :attr:`is_leader` is true only while leading *and* before ``last successful renew +
      renew_deadline`` by the clock; because ``renew_deadline < lease_duration``, no two
      electors of one lease are ever leaders at the same instant.
    * :meth:`stop` ends the loop. A leader calls ``on_stopped_leading`` and then, when
      ``release_on_stop`` is true, releases the lease so another replica takes over at its
      next attempt, within one jittered retry period (client-go's ``ReleaseOnCancel``).
      Cancelling the task that runs :meth:`run` does the same. A stopped elector does not
      run again; build a new one.

    Callbacks may be plain functions or coroutine functions. ``on_new_leader`` and
    ``on_stopped_leading`` are awaited in the election loop, so they should return promptly.
    The awaitable that ``on_started_leading`` returns runs as its own task for as long as
    this elector leads, like client-go's ``OnStartedLeading`` goroutine, and is cancelled when
    leadership ends. An exception raised by any callback is logged and the elector carries on.

    ``on_new_leader`` is called with this elector's own identity too when it takes the lease,
    as in client-go; it is not called when the lease is free (:attr:`leader` is then ``None``).
    """

    def __init__(
        self,
        lease: Lease,
        identity: str,
        *,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        clock: Clock | None = None,
        on_started_leading: Callable[[LeaseRecord], Awaitable[None] | None] | None = None,
        on_stopped_leading: Callable[[], Awaitable[None] | None] | None = None,
        on_new_leader: Callable[[str], Awaitable[None] | None] | None = None,
        release_on_stop: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        """Check the timings and build an elector; nothing happens until :meth:`run`.

        Args:
            lease: the lease all replicas contend for.
            identity: the name this replica holds the lease under. Make it unique to the
                process, not just the host (client-go uses ``hostname_uuid``): a restarted
                process that reused it could be mistaken for its predecessor.
            lease_duration_s: seconds a lease stays valid without renewal (``LEASE_DURATION``).
                15 s, as client-go and the seed guide: failover within about 5 s of expiry.
            renew_deadline_s: seconds a leader keeps retrying a renew before it stops acting
                (``RENEW_DEADLINE``). 10 s leaves 5 s between the last act and the expiry.
            retry_period_s: seconds between attempts (``RETRY_PERIOD``). 2 s keeps the
                backend load low while a follower still notices a release within 2.4 s.
            clock: the clock that times everything; defaults to ``lease.clock``, so that the
                elector and the lease's expiry agree.
            on_started_leading: called with the held record when this elector becomes leader.
            on_stopped_leading: called when this elector stops leading, for whatever reason.
            on_new_leader: called with the holder's identity each time a new holder is seen.
            release_on_stop: release the lease in :meth:`stop` so a follower need not wait
                for it to expire.
            rng: source of the followers' jitter; inject a seeded one for repeatable tests.

        Raises:
            ConfigError: a timing is not positive, ``lease_duration_s <= renew_deadline_s``,
                ``renew_deadline_s <= 1.2 * retry_period_s``, or ``identity`` is empty. The
                message names the environment variables.
        """
        _check_config(identity, lease_duration_s, renew_deadline_s, retry_period_s)
        self.lease = lease
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.release_on_stop = release_on_stop
        self._clock: Clock = clock if clock is not None else lease.clock
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        self._on_new_leader = on_new_leader
        self._rng = rng if rng is not None else random.Random()

        self._leading = False
        self._record: LeaseRecord | None = None
        self._last_renew = -math.inf
        """Clock monotonic time at which the last successful acquire or renew *started*:
        the backend wrote the expiry no earlier, so the deadline counted from here is safe."""
        self._leader: str | None = None
        self._leader_task: asyncio.Future[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._leading_event = asyncio.Event()

    @classmethod
    def from_settings(
        cls,
        lease: Lease,
        identity: str,
        settings: AgentSettings,
        *,
        clock: Clock | None = None,
        on_started_leading: Callable[[LeaseRecord], Awaitable[None] | None] | None = None,
        on_stopped_leading: Callable[[], Awaitable[None] | None] | None = None,
        on_new_leader: Callable[[str], Awaitable[None] | None] | None = None,
        release_on_stop: bool = True,
        rng: random.Random | None = None,
    ) -> Self:
        """Build an elector with ``LEASE_DURATION``, ``RENEW_DEADLINE`` and ``RETRY_PERIOD``.

        The other arguments are those of the constructor.

        Raises:
            ConfigError: as the constructor.
        """
        return cls(
            lease,
            identity,
            lease_duration_s=settings.lease_duration,
            renew_deadline_s=settings.renew_deadline,
            retry_period_s=settings.retry_period,
            clock=clock,
            on_started_leading=on_started_leading,
            on_stopped_leading=on_stopped_leading,
            on_new_leader=on_new_leader,
            release_on_stop=release_on_stop,
            rng=rng,
        )

    @property
    def is_leader(self) -> bool:
        """Whether this elector may act as leader now.

        True only while it leads and before its last successful renew plus the renew
        deadline, read from the clock at every call: a leader whose renew hangs stops being
        leader at its deadline, before the lease expires, even if the loop has not noticed.
        """
        return self._leading and self._clock.monotonic() < self._last_renew + self.renew_deadline_s

    @property
    def leader(self) -> str | None:
        """The identity of the holder last observed (this elector's own when it leads).

        ``None`` before anything was observed, and while the lease is free.
        """
        return self._leader

    @property
    def record(self) -> LeaseRecord | None:
        """The lease record this elector holds, as last acquired or renewed.

        ``None`` whenever :attr:`is_leader` is false.
        """
        return self._record if self.is_leader else None

    @property
    def epoch(self) -> int | None:
        """The epoch of the held record; ``None`` whenever :attr:`is_leader` is false."""
        record = self.record
        return record.epoch if record is not None else None

    def fencing_token(self) -> int:
        """Return the epoch to present to others as proof of leadership.

        Raises:
            LeaseLost: this elector is not the leader now (see :attr:`is_leader`).
        """
        epoch = self.epoch
        if epoch is None:
            raise LeaseLost(f"{self.identity!r} is not the leader")
        return epoch

    async def wait_leading(self) -> None:
        """Return once this elector leads; at once if it leads now.

        Raises:
            LeaseLost: the elector was stopped before it led.
        """
        if self._leading_event.is_set():
            return
        leading = asyncio.ensure_future(self._leading_event.wait())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({leading, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leading.cancel()
            stopped.cancel()
        if not self._leading_event.is_set():
            raise LeaseLost(f"the elector of {self.identity!r} stopped before it led")

    async def run(self) -> None:
        """Take part in the election until :meth:`stop` is called.

        Returns at once if the elector was already stopped.

        Raises:
            RuntimeError: it is already running.
        """
        if self._stop.is_set():
            return
        if self._run_task is not None:
            raise RuntimeError(f"the elector of {self.identity!r} is already running")
        self._run_task = asyncio.current_task()
        try:
            while True:
                record, started = await self._acquire()
                await self._start_leading(record, started)
                reason = await self._keep_leading()
                await self._step_down(reason, lost=True, release=False)
        except _Stopping:
            pass
        finally:
            try:
                # Also reached when the task running us is cancelled: client-go's
                # ReleaseOnCancel releases on context cancellation, and so do we.
                await self._step_down("the elector is stopping", lost=False, release=True)
            finally:
                self._stop.set()
                self._done.set()
                logger.info("Leader election of %s stopped", self.identity)

    async def stop(self) -> None:
        """Stop the loop; a leader steps down and, if ``release_on_stop``, releases the lease.

        Waits until :meth:`run` has returned, unless called from inside it (from a callback).
        Idempotent, and safe before :meth:`run`: the elector then never runs.
        """
        self._stop.set()
        task = self._run_task
        if task is not None and task is not asyncio.current_task():
            await self._done.wait()

    # -- the phases -------------------------------------------------------------------------

    async def _acquire(self) -> tuple[LeaseRecord, float]:
        """Try to take the lease every jittered retry period until it is ours."""
        logger.info("Attempting to acquire leader lease")
        while True:
            started = self._clock.monotonic()
            try:
                record = await self._guard(self._try_acquire)
            except _Stopping:
                raise
            except TimeoutError:
                logger.warning(
                    "Leader lease backend did not answer within %s; retrying",
                    _seconds(self.renew_deadline_s),
                )
            except Exception as exc:
                logger.warning("Could not acquire leader lease (%r); retrying", exc)
            else:
                if record is not None:
                    return record, started
                await self._observe_holder()
            await self._guard(partial(self._clock.sleep, self._jittered_retry()))

    async def _start_leading(self, record: LeaseRecord, started: float) -> None:
        self._record = record
        self._last_renew = started
        self._leading = True
        logger.info("Successfully acquired leader lease (epoch %d)", record.epoch)
        logger.info("This agent is the LEADER")
        await self._observe(self.identity)
        if self._on_started_leading is not None:
            try:
                result = self._on_started_leading(record)
            except Exception:
                logger.exception("The on_started_leading callback failed; carrying on")
            else:
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    task.add_done_callback(self._log_started_leading)
                    self._leader_task = task
        self._leading_event.set()

    async def _keep_leading(self) -> str:
        """Renew every retry period while that works; return why leadership ended."""
        while True:
            await self._guard(partial(self._clock.sleep, self.retry_period_s))
            failure = "no renew was attempted"
            while True:
                deadline = self._last_renew + self.renew_deadline_s
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0:
                    return (
                        f"could not renew within RENEW_DEADLINE "
                        f"({_seconds(self.renew_deadline_s)}): {failure}"
                    )
                started = self._clock.monotonic()
                try:
                    record = await self._guard(partial(self._renew, remaining))
                except _Stopping:
                    raise
                except LeaseLost as exc:
                    return f"another replica holds it ({exc})"
                except TimeoutError:
                    failure = "the last renew timed out"
                except Exception as exc:
                    failure = f"the last renew failed with {exc!r}"
                    logger.warning("Could not renew leader lease (%r); retrying", exc)
                else:
                    held = self._record
                    if record.holder != self.identity or (
                        held is not None and record.epoch != held.epoch
                    ):
                        return f"the backend returned a lease of epoch {record.epoch}"
                    self._record = record
                    self._last_renew = started
                    break
                pause = min(self.retry_period_s, deadline - self._clock.monotonic())
                if pause > 0:
                    await self._guard(partial(self._clock.sleep, pause))

    async def _step_down(self, reason: str, *, lost: bool, release: bool) -> None:
        """Stop acting as leader now; then tell the callback, then maybe release."""
        if not self._leading:
            return
        self._leading = False
        self._leading_event.clear()
        if lost:
            logger.warning("Lost leader lease: %s; this agent is no longer the LEADER", reason)
        else:
            logger.info("Stepping down as LEADER: %s", reason)
        task, self._leader_task = self._leader_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        if self._on_stopped_leading is not None:
            await self._call("on_stopped_leading", self._on_stopped_leading)
        if release and self.release_on_stop:
            try:
                await wait_for(
                    self._clock, self.lease.release(self.identity), self.renew_deadline_s
                )
            except Exception as exc:
                logger.warning("Could not release leader lease (%r); it will expire", exc)
            else:
                logger.info("Released leader lease")
                self._leader = None

    # -- helpers ----------------------------------------------------------------------------

    async def _try_acquire(self) -> LeaseRecord | None:
        return await wait_for(
            self._clock,
            self.lease.try_acquire(self.identity, self.lease_duration_s),
            self.renew_deadline_s,
        )

    async def _renew(self, timeout_s: float) -> LeaseRecord:
        return await wait_for(
            self._clock, self.lease.renew(self.identity, self.lease_duration_s), timeout_s
        )

    async def _observe_holder(self) -> None:
        """Read the lease after a failed acquire, to learn who holds it."""
        try:
            record = await self._guard(self._read)
        except _Stopping:
            raise
        except Exception as exc:
            logger.debug("Could not read leader lease (%r)", exc)
            return
        held = record is not None and record.is_held(self._clock.now())
        await self._observe(record.holder if record is not None and held else None)

    async def _read(self) -> LeaseRecord | None:
        return await wait_for(self._clock, self.lease.read(), self.renew_deadline_s)

    async def _observe(self, holder: str | None) -> None:
        if holder == self._leader:
            return
        self._leader = holder
        if holder is None:
            logger.info("The leader lease is free")
            return
        if holder != self.identity:
            logger.info("This agent is a FOLLOWER (leader: %s)", holder)
            logger.info("Watching leader lease for changes")
        if self._on_new_leader is not None:
            await self._call("on_new_leader", partial(self._on_new_leader, holder))

    def _jittered_retry(self) -> float:
        return self.retry_period_s * (1.0 + self._rng.random() * (_JITTER_FACTOR - 1.0))

    async def _guard(self, start: Callable[[], Awaitable[T]]) -> T:
        """Await ``start()``, but raise :class:`_Stopping` as soon as :meth:`stop` is called.

        Takes a factory, not an awaitable, so that nothing is created once stopping.
        """
        if self._stop.is_set():
            raise _Stopping
        task = asyncio.ensure_future(start())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.debug("Interrupted lease call failed", exc_info=task.exception())
        raise _Stopping

    @staticmethod
    async def _call(name: str, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Call a sync or async callback; log what it raises instead of raising it."""
        try:
            await maybe_await(callback())
        except Exception:
            logger.exception("The %s callback failed; carrying on", name)

    @staticmethod
    def _log_started_leading(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("The on_started_leading callback failed; carrying on", exc_info=exc)
