"""The hubs: ``memory`` (one process) and ``redis`` (several replicas, against the real Redis
on 127.0.0.1:6379, each test under a key redis_prefix of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from agentsim import eventually

from streamspace_controlplane.hub.base import Hub, HubUnavailable, Notice, Replica, Tickets
from streamspace_controlplane.hub.memory import MemoryHub
from streamspace_controlplane.hub.redis import RedisHub
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_sdk.drivers import HUBS, load_driver
from streamspace_sdk.errors import ConfigError
from streamspace_sdk.testing import TcpBalancer

REDIS_URL = "redis://127.0.0.1:6379/0"


class Conn:
    """An agent connection as the hub sees one (nothing is sent in these tests)."""

    def __init__(self, agent_id: str, conn_id: str) -> None:
        self.agent_id = agent_id
        self.conn_id = conn_id
        self.token_id = "t-1"

    async def send(self, frame: Any) -> None:
        raise ConnectionError("not a socket")

    async def send_binary(self, data: bytes) -> None:
        raise ConnectionError("not a socket")

    async def close(self, code: int, reason: str) -> None:
        return None


class Inbox:
    """Collects the notices a hub delivers; awaitable."""

    def __init__(self) -> None:
        self.got: list[tuple[Notice, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, notice: Notice, arg: str) -> None:
        self.got.append((notice, arg))
        self._changed.set()

    async def wait_for(self, notice: Notice, arg: str = "", timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while (notice, arg) not in self.got:
                self._changed.clear()
                await self._changed.wait()


async def hgetall(client: aioredis.Redis, key: str) -> dict[str, str]:
    found: dict[str, str] = await client.hgetall(key)  # type: ignore[misc]
    return found


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def redis_settings(
    redis_prefix: str, pod: str, tmp_path: Path, **overrides: Any
) -> ControlPlaneSettings:
    values: dict[str, Any] = {
        "streamspace_home": tmp_path,
        "agent_hub_backend": "redis",
        "redis_url": REDIS_URL,
        "redis_key_prefix": redis_prefix,
        "pod_name": pod,
        "internal_url": f"http://{pod}.internal:8080",
        "replica_timeout": "600ms",
        "agent_heartbeat_timeout": "3s",
    }
    return ControlPlaneSettings(**(values | overrides))


@pytest_asyncio.fixture
async def make_hub(redis_prefix: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start a redis hub for replica ``pod`` (stopped after the test unless stopped)."""
    started: list[RedisHub] = []

    async def make(pod: str, inbox: Inbox | None = None, **overrides: Any) -> RedisHub:
        hub = RedisHub(redis_settings(redis_prefix, pod, tmp_path, **overrides))
        if inbox is not None:
            hub.on_notice(inbox)
        await hub.start()
        started.append(hub)
        return hub

    try:
        yield make
    finally:
        for hub in reversed(started):
            if hub._tasks:
                await hub.stop()


# -- both hubs: this process's agents and tickets ------------------------------------------


@pytest_asyncio.fixture(params=["memory", "redis"])
async def hub(
    request: pytest.FixtureRequest, make_hub: Callable[..., Any], tmp_path: Path
) -> AsyncIterator[Hub]:
    if request.param == "memory":
        yield MemoryHub(ControlPlaneSettings(streamspace_home=tmp_path, pod_name="solo"))
    else:
        yield await make_hub("solo")


@pytest.mark.asyncio
async def test_a_newer_connection_supersedes_and_an_old_one_cannot_detach_it(hub: Hub) -> None:
    first, second = Conn("a1", "ws-1"), Conn("a1", "ws-2")
    assert await hub.attach(first) is None
    assert await hub.attach(second) is first
    assert not await hub.detach(first)
    assert hub.local("a1") is second
    assert hub.connected() == ["a1"]
    located = await hub.locate("a1")
    assert located is not None
    assert located.pod == "solo"
    assert await hub.send("a1", object()) is False  # type: ignore[arg-type]  # socket gone
    assert await hub.detach(second)
    assert hub.local("a1") is None
    assert await hub.locate("a1") is None


@pytest.mark.asyncio
async def test_a_ticket_is_taken_once(hub: Hub) -> None:
    await hub.put_ticket("k", "value", 30)
    assert await hub.take_ticket("k") == "value"
    assert await hub.take_ticket("k") is None
    assert await hub.take_ticket("never-put") is None


@pytest.mark.asyncio
async def test_a_hub_of_one_leads_and_tells_itself(tmp_path: Path) -> None:
    hub: Hub = load_driver(HUBS, "memory", settings=ControlPlaneSettings(streamspace_home=tmp_path))
    inbox = Inbox()
    hub.on_notice(inbox)
    assert hub.leading()
    hub.notify_leader("schedule")
    hub.notify_holder("nobody", "wake")  # not held: nothing to tell
    await hub.attach(Conn("a1", "ws-1"))
    hub.notify_holder("a1", "wake")
    assert inbox.got == [("schedule", ""), ("wake", "a1")]
    assert await hub.problems() == []


def test_memory_tickets_expire_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    tickets = Tickets(clock=lambda: now[0])
    tickets.put("old", "1", 10)
    now[0] += 10
    assert tickets.take("old") is None
    monkeypatch.setattr("streamspace_controlplane.hub.base.MAX_TICKETS", 3)
    for n in range(5):
        tickets.put(f"k{n}", str(n), 60)
    assert len(tickets) == 3
    assert tickets.take("k0") is None
    assert tickets.take("k4") == "4"


# -- redis: what Redis holds ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_keeps_the_seeds_keys_with_their_ttls(
    make_hub: Callable[..., Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    hub = await make_hub("pod-a")
    await hub.attach(Conn("k8s-prod-cluster", "ws-abc123"))
    key = f"{redis_prefix}agent:k8s-prod-cluster:conn:pod-a"
    value = await redis_client.get(key)
    assert value is not None
    assert value.startswith("ws-abc123 ")
    assert 0 < await redis_client.pttl(key) <= 3000
    assert await redis_client.get(f"{redis_prefix}pod:pod-a") == "http://pod-a.internal:8080"
    assert 0 < await redis_client.pttl(f"{redis_prefix}pod:pod-a") <= 600
    assert await hgetall(redis_client, f"{redis_prefix}pods") == {
        "pod-a": "http://pod-a.internal:8080"
    }
    await hub.put_ticket("vnc:abc", "grant", 60)
    assert 59_000 < await redis_client.pttl(f"{redis_prefix}ticket:vnc:abc") <= 60_000

    await redis_client.pexpire(key, 100)
    await hub.refresh(Conn("k8s-prod-cluster", "ws-other"))  # not the current one: ignored
    assert await redis_client.pttl(key) <= 100
    await hub.refresh(hub.local("k8s-prod-cluster"))
    assert await redis_client.pttl(key) > 2000

    await hub.stop()  # withdraws: nothing of it is left
    assert [k async for k in redis_client.scan_iter(match=f"{redis_prefix}*")] == [
        f"{redis_prefix}ticket:vnc:abc"
    ]


@pytest.mark.asyncio
async def test_replicas_locate_each_others_agents_newest_connection_first(
    make_hub: Callable[..., Any],
) -> None:
    a, b, c = await make_hub("pod-a"), await make_hub("pod-b"), await make_hub("pod-c")
    await a.attach(Conn("agent-1", "ws-a"))
    assert await b.locate("agent-1") == Replica("pod-a", "http://pod-a.internal:8080")
    assert await c.replicas() == {
        "pod-a": "http://pod-a.internal:8080",
        "pod-b": "http://pod-b.internal:8080",
        "pod-c": "http://pod-c.internal:8080",
    }
    # The agent reconnected to C before A noticed: the newer entry wins.
    await c.attach(Conn("agent-1", "ws-c"))
    located = await b.locate("agent-1")
    assert located is not None
    assert located.pod == "pod-c"
    # A's late cleanup cannot remove C's entry, only its own.
    assert await a.detach(a.local("agent-1"))
    located = await b.locate("agent-1")
    assert located is not None
    assert located.pod == "pod-c"
    await c.detach(c.local("agent-1"))
    assert await b.locate("agent-1") is None


@pytest.mark.asyncio
async def test_notices_reach_the_holder_and_the_leader(make_hub: Callable[..., Any]) -> None:
    inbox_a, inbox_b = Inbox(), Inbox()
    a = await make_hub("pod-a", inbox_a)
    b = await make_hub("pod-b", inbox_b)
    assert a.leading()
    assert not b.leading()
    await a.attach(Conn("agent-1", "ws-a"))
    b.notify_holder("agent-1", "wake")
    await inbox_a.wait_for("wake", "agent-1")
    b.notify_leader("schedule")
    await inbox_a.wait_for("schedule")
    a.notify_leader("reconcile")  # the leader tells itself, without Redis
    assert inbox_a.got[-1] == ("reconcile", "")
    b.notify_holder("nobody", "wake")  # held by none: dropped
    assert ("wake", "nobody") not in inbox_a.got + inbox_b.got


@pytest.mark.asyncio
async def test_a_stopped_leader_hands_over_and_the_new_one_is_told(
    make_hub: Callable[..., Any],
) -> None:
    inbox_b = Inbox()
    a = await make_hub("pod-a")
    b = await make_hub("pod-b", inbox_b)
    assert a.leading()
    assert not b.leading()
    await a.stop()
    await inbox_b.wait_for("lead")
    assert b.leading()


@pytest.mark.asyncio
async def test_a_crashed_replicas_entries_are_cleared_by_the_leader(
    make_hub: Callable[..., Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    inbox_b = Inbox()
    a = await make_hub("pod-a")
    b = await make_hub("pod-b", inbox_b)
    await a.attach(Conn("agent-1", "ws-a"))
    for task in a._tasks:  # a crash: it stops beating and withdraws nothing
        task.cancel()
    a._tasks = []
    await inbox_b.wait_for("lead")  # A's lease ran out

    async def cleared() -> bool:
        return await hgetall(redis_client, f"{redis_prefix}pods") == {
            "pod-b": "http://pod-b.internal:8080"
        }

    await eventually(cleared, timeout_s=5)
    assert await redis_client.exists(f"{redis_prefix}agent:agent-1:conn:pod-a") == 0
    assert await b.locate("agent-1") is None
    await a._redis.aclose()


@pytest.mark.asyncio
async def test_malformed_inbox_messages_are_ignored(
    make_hub: Callable[..., Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = Inbox()
    await make_hub("pod-a", inbox)
    channel = f"{redis_prefix}inbox:pod-a"
    with caplog.at_level(logging.WARNING, "streamspace.controlplane.hub"):
        for junk in ("not json", "[1, 2]", json.dumps({"notice": "explode"}), "{}"):
            await redis_client.publish(channel, junk)
        await redis_client.publish(channel, json.dumps({"notice": "wake", "arg": "agent-1"}))
        await inbox.wait_for("wake", "agent-1")
    assert inbox.got == [("lead", ""), ("wake", "agent-1")]
    ignored = [r.getMessage() for r in caplog.records if "Ignored" in r.getMessage()]
    assert len(ignored) == 4, ignored


# -- redis: configuration and outages -------------------------------------------------------


def test_configuration_errors_name_the_variable(redis_prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL: is required"):
        RedisHub(redis_settings(redis_prefix, "p", tmp_path, redis_url=None))
    with pytest.raises(ConfigError, match="REDIS_URL: must be a redis://"):
        RedisHub(redis_settings(redis_prefix, "p", tmp_path, redis_url="http://127.0.0.1:6379"))
    with pytest.raises(ConfigError, match="INTERNAL_URL: is required with PORT=0"):
        RedisHub(redis_settings(redis_prefix, "p", tmp_path, internal_url=None, port=0))
    with pytest.raises(ValueError, match="not an http"):
        redis_settings(redis_prefix, "p", tmp_path, internal_url="tcp://10.0.0.1")
    from_pod_ip = RedisHub(
        redis_settings(redis_prefix, "p", tmp_path, internal_url=None, pod_ip="10.1.2.3")
    )
    assert from_pod_ip.url == "http://10.1.2.3:8080"


@pytest.mark.asyncio
async def test_no_redis_at_start_fails_saying_where_without_the_password(
    redis_prefix: str, tmp_path: Path
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    hub = RedisHub(redis_settings(redis_prefix, "p", tmp_path, redis_url=url))
    with pytest.raises(HubUnavailable, match=r"redis unreachable at redis://:\*\*\*@127") as err:
        await hub.start()
    assert "hunter2" not in str(err.value)


@pytest.mark.asyncio
async def test_a_redis_outage_is_reported_and_local_agents_stay_served(
    make_hub: Callable[..., Any],
) -> None:
    async with TcpBalancer([("127.0.0.1", 6379)]) as lb:
        hub = await make_hub("pod-a", redis_url=f"redis://127.0.0.1:{lb.port}/0")
        assert await hub.problems() == []
        lb.backends = [("127.0.0.1", closed_port())]
        lb.cut()
        problems = await hub.problems()
        assert len(problems) == 1
        assert problems[0].startswith("redis unreachable at redis://")
        conn = Conn("agent-1", "ws-a")
        assert await hub.attach(conn) is None  # logged; the agent is served here all the same
        assert hub.local("agent-1") is conn
        with pytest.raises(HubUnavailable, match="cannot redeem a ticket"):
            await hub.take_ticket("k")
        lb.backends = [("127.0.0.1", 6379)]
        assert await hub.problems() == []
        await hub.refresh(conn)  # the entry comes back with the next heartbeat
        located = await hub.locate("agent-1")
        assert located is not None
        assert located.pod == "pod-a"
        with contextlib.suppress(HubUnavailable):
            await hub.stop()


@pytest.mark.asyncio
async def test_a_quiet_inbox_stays_subscribed(
    make_hub: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Quiet channels are normal: longer than Redis calls may take, no reconnects."""
    from streamspace_controlplane.hub import redis as redis_hub

    inbox_a = Inbox()
    await make_hub("pod-a", inbox_a)
    b = await make_hub("pod-b")
    with caplog.at_level(logging.WARNING, "streamspace.controlplane.hub"):
        await asyncio.sleep(redis_hub._TIMEOUT_S * 1.5)  # nothing to await: time passing
        b.notify_leader("schedule")
        await inbox_a.wait_for("schedule")
    assert not [r for r in caplog.records if "subscription lost" in r.getMessage()]
