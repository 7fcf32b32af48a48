"""A Redis of the tests' own, killed with SIGKILL and started again, empty (no persistence)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis
from conftest import LeaseMaker, RedisServer

from streamspace_sdk.elector import LeaderElector
from streamspace_sdk.errors import LeaseError, LeaseLost
from streamspace_sdk.lease import LeaseRecord


def leading(elector: LeaderElector) -> bool:
    """Whether ``elector`` may act as leader now (read afresh at every call)."""
    return elector.is_leader


def assert_clear_failure(exc: BaseException, server: RedisServer) -> None:
    """A connection failure: a plain LeaseError naming REDIS_URL, without the password."""
    assert type(exc) is LeaseError, f"{exc!r} must be a LeaseError, not LeaseLost"
    assert f"REDIS_URL redis://:***@127.0.0.1:{server.port}/0" in str(exc)
    assert "unreachable" in str(exc)
    assert server.password not in str(exc)


@pytest.mark.asyncio
async def test_calls_fail_clearly_while_down_and_work_again_after(
    new_lease: LeaseMaker, own_redis: RedisServer
) -> None:
    """While Redis is down every call is a ``LeaseError``; once it is back the same object
    reconnects, the old holder's lease is gone, and a new acquisition gets a higher epoch
    although the restarted Redis lost the counter."""
    lease = new_lease(own_redis.url())
    first = await lease.try_acquire("a", 30.0)
    assert first is not None

    await own_redis.kill()
    for call in (
        lease.try_acquire("b", 30.0),
        lease.renew("a", 30.0),
        lease.release("a"),
        lease.read(),
    ):
        with pytest.raises(LeaseError) as caught:
            await call
        assert_clear_failure(caught.value, own_redis)

    await own_redis.start()
    with pytest.raises(LeaseLost):
        await lease.renew("a", 30.0)
    second = await lease.try_acquire("b", 30.0)
    assert second is not None
    assert second.epoch > first.epoch, "the epoch must not go back after a restart"

    check = aioredis.Redis.from_url(own_redis.url(), decode_responses=True)
    try:
        assert await check.get(f"{lease.epoch_key}") == str(second.epoch)
    finally:
        await check.aclose()


@pytest.mark.asyncio
async def test_elector_steps_down_and_comes_back(
    new_lease: LeaseMaker, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An elected leader whose Redis dies stops leading by its renew deadline, keeps trying
    while Redis is down, and leads again, at a higher epoch, once Redis is back. The
    password appears in no log line."""
    caplog.set_level(logging.DEBUG)
    started: asyncio.Queue[LeaseRecord] = asyncio.Queue()
    stopped = asyncio.Event()
    elector = LeaderElector(
        new_lease(own_redis.url()),
        "replica-1",
        lease_duration_s=2.0,
        renew_deadline_s=1.0,
        retry_period_s=0.2,
        on_started_leading=started.put_nowait,
        on_stopped_leading=stopped.set,
    )
    run = asyncio.create_task(elector.run())
    try:
        first = await asyncio.wait_for(started.get(), 10)
        assert leading(elector)

        loop = asyncio.get_running_loop()
        await own_redis.kill()
        killed = loop.time()
        await asyncio.wait_for(stopped.wait(), 10)
        assert not leading(elector)
        # The last renew was at most one retry period before the kill.
        assert loop.time() - killed < 1.0 + 0.5, "it must stop by its renew deadline"

        await own_redis.start()
        second = await asyncio.wait_for(started.get(), 10)
        assert leading(elector)
        assert second.epoch > first.epoch
    finally:
        await elector.stop()
        await run
    assert "unreachable" in caplog.text, "the failures must be logged"
    assert f"127.0.0.1:{own_redis.port}" in caplog.text
    assert own_redis.password not in caplog.text
