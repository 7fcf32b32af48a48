"""What the redis lease stores, how it fences stale holders, and how it treats bad input."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis
from conftest import (
    SHARED_URL,
    LeaseMaker,
    RedisServer,
    free_port,
    server_time_ms,
    settings,
)
from pydantic import SecretStr

from streamspace_lease_redis import RedisLease
from streamspace_lease_redis.lease import _LUA_HELPERS
from streamspace_sdk import drivers
from streamspace_sdk.errors import ConfigError, LeaseError, LeaseLost
from streamspace_sdk.lease import Lease
from streamspace_sdk.settings import load_settings
from streamspace_sdk.testing.clock import FakeClock

# -- what is stored -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_key_layout_is_the_seeds(
    new_lease: LeaseMaker, lease_key: str, plain: aioredis.Redis
) -> None:
    """``lease:<LEASE_KEY>`` holds the seed's JSON plus epoch and renewed, with PX = duration;
    the epoch counter sits beside it without a TTL."""
    lease = new_lease()
    record = await lease.try_acquire("docker-host-01", 3.0)
    assert record is not None
    raw = await plain.get(f"lease:{lease_key}")
    assert raw is not None
    data = json.loads(raw)
    assert set(data) == {"holder", "acquired", "expires", "renewed", "epoch"}
    assert data["holder"] == "docker-host-01"
    assert data["epoch"] == record.epoch
    assert all(data[f].endswith("Z") for f in ("acquired", "expires", "renewed"))
    assert datetime.fromisoformat(data["acquired"]) == record.acquired_at
    assert datetime.fromisoformat(data["renewed"]) == record.renewed_at
    assert datetime.fromisoformat(data["expires"]) == record.expires_at
    assert record.expires_at - record.renewed_at == timedelta(seconds=3)
    assert 2000 < await plain.pttl(f"lease:{lease_key}") <= 3000
    assert await plain.get(f"lease:{lease_key}:epoch") == str(record.epoch)
    assert await plain.pttl(f"lease:{lease_key}:epoch") == -1, "the counter must not expire"

    renewed = await lease.renew("docker-host-01", 1.5)
    data = json.loads(await plain.get(f"lease:{lease_key}"))
    assert datetime.fromisoformat(data["acquired"]) == record.acquired_at
    assert datetime.fromisoformat(data["renewed"]) == renewed.renewed_at >= record.renewed_at
    assert 500 < await plain.pttl(f"lease:{lease_key}") <= 1500, "renew must reset the TTL"

    await lease.release("docker-host-01")
    assert await plain.exists(f"lease:{lease_key}") == 0
    assert await plain.get(f"lease:{lease_key}:epoch") == str(record.epoch), "release keeps it"
    assert await lease.read() is None


@pytest.mark.asyncio
async def test_times_are_the_servers(new_lease: LeaseMaker, plain: aioredis.Redis) -> None:
    """Record times come from Redis's TIME, not from the clock the lease was given."""
    fake = FakeClock(datetime(2001, 1, 1, tzinfo=UTC))
    lease = new_lease(clock=fake)
    before = await server_time_ms(plain)
    record = await lease.try_acquire("a", 5.0)
    after = await server_time_ms(plain)
    assert record is not None
    stamp = record.acquired_at.timestamp() * 1000
    assert before <= stamp <= after
    assert record.renewed_at == record.acquired_at


@pytest.mark.asyncio
async def test_lua_iso_dates_match_python(plain: aioredis.Redis) -> None:
    """The scripts' own ms → ISO 8601 conversion agrees with Python's, leap days included."""
    values = [0, 951_782_400_000, 951_868_799_999, 4_107_542_400_000, 1_709_164_800_123]
    values += [random.randrange(0, 8_000_000_000_000) for _ in range(300)]
    script = (
        _LUA_HELPERS
        + "local o = {} for i, v in ipairs(ARGV) do o[i] = iso(tonumber(v)) end return o"
    )
    got = await cast("Awaitable[list[str]]", plain.eval(script, 0, *values))
    want = [
        datetime.fromtimestamp(v / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{v % 1000:03d}Z"
        for v in values
    ]
    assert got == want


@pytest.mark.asyncio
async def test_missing_counter_is_seeded_from_server_time(
    new_lease: LeaseMaker, lease_key: str, plain: aioredis.Redis
) -> None:
    """A first acquisition (or one after a restart lost the counter) gets TIME in ms + 1;
    with the counter present, each new holder gets the next number."""
    lease = new_lease()
    before = await server_time_ms(plain)
    first = await lease.try_acquire("a", 5.0)
    after = await server_time_ms(plain)
    assert first is not None
    assert before + 1 <= first.epoch <= after + 1
    await lease.release("a")
    await plain.set(f"lease:{lease_key}:epoch", 41)
    second = await lease.try_acquire("b", 5.0)
    assert second is not None
    assert second.epoch == 42


@pytest.mark.asyncio
async def test_reacquire_by_holder_renews(
    new_lease: LeaseMaker, lease_key: str, plain: aioredis.Redis
) -> None:
    """Acquiring a lease you hold keeps its epoch and acquired time, and resets the TTL."""
    lease = new_lease()
    first = await lease.try_acquire("a", 0.5)
    again = await lease.try_acquire("a", 5.0)
    assert first is not None
    assert again is not None
    assert (again.epoch, again.acquired_at) == (first.epoch, first.acquired_at)
    assert await plain.pttl(f"lease:{lease_key}") > 4000
    assert await plain.get(f"lease:{lease_key}:epoch") == str(first.epoch)


# -- fencing ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_renew_by_non_holder_is_lost(new_lease: LeaseMaker) -> None:
    a, b = new_lease(), new_lease()
    with pytest.raises(LeaseLost, match="lapsed"):
        await b.renew("b", 5.0)
    await a.try_acquire("a", 5.0)
    with pytest.raises(LeaseLost, match="'a' holds it"):
        await b.renew("b", 5.0)
    record = await b.read()
    assert record is not None
    assert record.holder == "a"


@pytest.mark.asyncio
async def test_renew_after_expiry_is_lost(new_lease: LeaseMaker) -> None:
    """Redis drops the key at the lease's expiry; a renew after that is ``LeaseLost``."""
    lease = new_lease()
    record = await lease.try_acquire("a", 0.2)
    assert record is not None
    await asyncio.sleep(0.35)  # let the lease lapse, in Redis's time
    with pytest.raises(LeaseLost, match="lapsed"):
        await lease.renew("a", 5.0)
    assert await lease.read() is None


@pytest.mark.asyncio
async def test_stale_epoch_cannot_renew_or_release(new_lease: LeaseMaker) -> None:
    """An object whose lease lapsed and was taken again under the same holder name, at a
    newer epoch, can neither renew nor release the new one."""
    old, new = new_lease(), new_lease()
    first = await old.try_acquire("a", 0.2)
    assert first is not None
    await asyncio.sleep(0.35)  # let it lapse
    second = await new.try_acquire("a", 5.0)
    assert second is not None
    assert second.epoch > first.epoch
    with pytest.raises(LeaseLost, match=f"epoch {second.epoch}"):
        await old.renew("a", 5.0)
    await old.release("a")
    record = await new.read()
    assert record is not None
    assert (record.holder, record.epoch) == ("a", second.epoch), "a stale release must not act"
    assert (await new.renew("a", 5.0)).epoch == second.epoch


@pytest.mark.asyncio
async def test_release_by_non_holder_changes_nothing(
    new_lease: LeaseMaker, lease_key: str, plain: aioredis.Redis
) -> None:
    a, b = new_lease(), new_lease()
    await a.try_acquire("a", 5.0)
    before = await plain.get(f"lease:{lease_key}")
    await b.release("b")
    await b.release("never-held")
    assert await plain.get(f"lease:{lease_key}") == before
    assert await plain.pttl(f"lease:{lease_key}") > 3000


@pytest.mark.asyncio
async def test_corrupt_key_is_a_lease_error(
    new_lease: LeaseMaker, lease_key: str, plain: aioredis.Redis
) -> None:
    lease = new_lease()
    await plain.set(f"lease:{lease_key}", "not json", px=5000)
    with pytest.raises(LeaseError, match=f"lease:{lease_key}"):
        await lease.read()
    with pytest.raises(LeaseError, match="answered with an error"):
        await lease.try_acquire("a", 5.0)


@pytest.mark.asyncio
async def test_record_in_the_seeds_layout_is_read(
    new_lease: LeaseMaker, lease_key: str, plain: aioredis.Redis
) -> None:
    """A record of the seed's layout (no epoch, no renewed) reads as epoch 0 and is not
    taken over while its key lives."""
    seed = {
        "holder": "docker-host-01",
        "acquired": "2025-11-22T10:30:00Z",
        "expires": "2025-11-22T10:30:15Z",
    }
    await plain.set(f"lease:{lease_key}", json.dumps(seed), px=5000)
    lease = new_lease()
    record = await lease.read()
    assert record is not None
    assert (record.holder, record.epoch) == ("docker-host-01", 0)
    assert record.renewed_at == record.acquired_at == datetime(2025, 11, 22, 10, 30, tzinfo=UTC)
    assert await lease.try_acquire("b", 5.0) is None


# -- the client ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_close_closes_the_connections(
    new_lease: LeaseMaker, lease_key: str, plain: aioredis.Redis
) -> None:
    name = f"close-{lease_key}"
    lease = new_lease(f"{SHARED_URL}?client_name={name}")
    await lease.try_acquire("a", 5.0)

    async def named() -> int:
        clients = await plain.client_list()
        return sum(1 for c in clients if c["name"] == name)

    assert await named() == 1
    await lease.close()
    # The server drops the client when it reads the EOF; there is nothing to await for that.
    for _ in range(200):
        if not await named():
            break
        await asyncio.sleep(0.01)
    assert await named() == 0
    record = await new_lease().read()
    assert record is not None
    assert record.holder == "a", "close must not release the lease"


@pytest.mark.asyncio
async def test_entry_point_loads_the_driver(lease_key: str) -> None:
    lease = drivers.load_driver(
        drivers.LEASES, "redis", base=Lease, settings=settings(SHARED_URL, lease_key)
    )
    try:
        assert isinstance(lease, RedisLease)
        assert await lease.try_acquire("a", 5.0) is not None
    finally:
        await lease.close()
    (info,) = [p for p in drivers.list_plugins([drivers.LEASES]) if p.name == "redis"]
    assert info.distribution == "streamspace-lease-redis"
    assert info.capabilities == ("exclusive",)
    assert info.error is None


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://:hunter2@host:6379/0", "redis:// or rediss://"),
        ("unix:///run/redis.sock?password=hunter2", "redis:// or rediss://"),
        ("host:6379", "redis:// or rediss://"),
        ("redis://:hunter2@host:63a9/0", "port"),
        ("redis://:hunter2@:6379/0", "no host"),
        ("redis://:hunter2@host:6379/zero", "database number"),
    ],
)
def test_bad_url_is_a_config_error(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_URL: ") as caught:
        load_settings(RedisLease.Settings, redis_url=url)
    assert why in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@shared-redis.example.com:6379")
    monkeypatch.delenv("LEASE_KEY", raising=False)
    lease = RedisLease()
    assert lease.key == "lease:docker-agent-leader"
    assert lease.epoch_key == "lease:docker-agent-leader:epoch"
    assert lease.url == "redis://:***@shared-redis.example.com:6379"
    assert "hunter2" not in repr(lease.config)

    monkeypatch.setenv("REDIS_URL", "memcached://:hunter2@cache:11211")
    with pytest.raises(ConfigError, match="REDIS_URL") as caught:
        RedisLease()
    assert "hunter2" not in str(caught.value)

    monkeypatch.delenv("REDIS_URL")
    with pytest.raises(ConfigError, match="REDIS_URL: is required"):
        RedisLease()


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("ssl_ca_certs=/etc/ca.pem", "option redis-py does not take"),
        ("db=x", "db"),
        ("password=hunter2&bogus=hunter2", "option redis-py does not take"),
    ],
)
def test_bad_url_option_is_a_config_error(query: str, why: str) -> None:
    """An option redis-py refuses fails when the lease is built, not at the first call."""
    with pytest.raises(ConfigError, match=r"^REDIS_URL: ") as caught:
        RedisLease(settings(f"redis://:hunter2@h:6379/0?{query}", "k"))
    assert why in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_empty_lease_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LEASE_KEY"):
        load_settings(RedisLease.Settings, redis_url=SHARED_URL, lease_key="")


def test_other_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"RedisLease\.Settings"):
        RedisLease(Lease.Settings())


@pytest.mark.asyncio
async def test_wrong_password_is_a_lease_error(
    new_lease: LeaseMaker, own_redis: RedisServer
) -> None:
    """A wrong or missing password: ``LeaseError`` saying so, with neither password in it."""
    for url in (own_redis.url("wrong-pw-1234"), own_redis.url("").replace(":@", "")):
        lease = new_lease(url)
        with pytest.raises(LeaseError, match="authentication failed") as caught:
            await lease.try_acquire("a", 5.0)
        assert not isinstance(caught.value, LeaseLost)
        assert f"127.0.0.1:{own_redis.port}" in str(caught.value)
        assert "wrong-pw-1234" not in str(caught.value)
        assert own_redis.password not in str(caught.value)
    lease = new_lease(own_redis.url())
    assert await lease.try_acquire("a", 5.0) is not None, "the right password must work"


@pytest.mark.asyncio
async def test_nothing_listening_is_a_lease_error(new_lease: LeaseMaker) -> None:
    port = free_port()
    lease = new_lease(f"redis://:hunter2@127.0.0.1:{port}/0")
    for call in (lease.try_acquire("a", 5.0), lease.renew("a", 5.0), lease.read()):
        with pytest.raises(LeaseError, match="unreachable") as caught:
            await call
        assert not isinstance(caught.value, LeaseLost)
        assert f"REDIS_URL redis://:***@127.0.0.1:{port}/0" in str(caught.value)
        assert "hunter2" not in str(caught.value)


@pytest.mark.asyncio
async def test_rediss_verifies_the_server(new_lease: LeaseMaker, tls_files: Path) -> None:
    """``rediss://`` talks TLS, and refuses a server its CA did not sign."""
    server = RedisServer("tls-pw-5678", tls=tls_files)
    await server.start()
    try:
        assert await new_lease(server.url()).try_acquire("a", 5.0) is not None
        # redis-py 7 says "certificate verify failed"; 5.0 only "Error 1 connecting".
        with pytest.raises(LeaseError, match="unreachable") as caught:
            await new_lease(server.url(ca="other.pem")).read()
        assert "tls-pw-5678" not in str(caught.value)
        cleartext = server.url().replace("rediss://", "redis://").partition("?")[0]
        with pytest.raises(LeaseError, match="unreachable"):
            await new_lease(cleartext).read()
    finally:
        await server.kill()


def test_secret_is_redacted_in_settings() -> None:
    config = RedisLease.Settings(redis_url=SecretStr("redis://:hunter2@h:6379"))
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.model_dump())
