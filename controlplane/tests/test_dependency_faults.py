"""A bad network between the control plane and its dependencies, PostgreSQL and Redis.

Each dependency is reached through a :class:`TcpBalancer` whose :class:`Faults` a test
turns on and off while a served control plane runs, with a simulated agent connected.
Expected outcomes, one test each:

- PostgreSQL slow and sliced (20 ms per chunk, 7-byte pieces): a session is created and
  its start command completes, only slower.
- PostgreSQL black hole (connections open, nothing answers): every request that needs the
  store answers 503 ``unavailable`` within ``DATABASE_TIMEOUT`` (plus the wait for a
  pooled connection), never a 500 and never a hang; ``/ready`` says the store did not
  answer in time; the agent stays connected. Once the hole closes, requests succeed again
  and the session that ran runs on.
- PostgreSQL connections reset mid-query, with a real SDK agent: the requests caught
  answer 503 (never a 500), the pool opens new connections, later requests succeed, no
  session is started twice, and within :data:`SETTLE_S` of the resets stopping every
  session the agent runs is ``running``. An ack, result or status report whose recording
  a reset interrupts closes the agent's socket (1013); the agent reconnects and is sent
  its unfinished commands again, which it answers from its memory of results; a result
  stored whose session's transition was cut off is applied again by the reconciler.
- Redis slow (redis hub): an agent registers and a command reaches it.
- Redis black hole: ``/ready`` answers 503 naming Redis within the hub's Redis timeout,
  the agent held here is still served, and ``/ready`` is 200 again once the hole closes.
- Redis connections reset: the inbox subscription comes back on a new connection and the
  hub is ready again.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis.asyncio as aioredis
from agentsim import (
    AgentSim,
    Harness,
    eventually,
    fast_settings,
    sdk_agent,
    serve_control_plane,
)

from streamspace_controlplane.hub.redis import _TIMEOUT_S as REDIS_TIMEOUT_S
from streamspace_controlplane.store.postgres import PostgresStore
from streamspace_controlplane.store.sqlite import SqliteStore
from streamspace_sdk.testing import Faults, MemoryPlatform, TcpBalancer

REDIS = ("127.0.0.1", 6379)
DATABASE_TIMEOUT_S = 0.5
"""DATABASE_TIMEOUT of the control plane in these tests."""
BOUND_S = 2 * DATABASE_TIMEOUT_S + 1.0
"""Longest a request may take in the black hole: a wait for a pooled connection and one
statement, each bounded by DATABASE_TIMEOUT, and a second for a busy machine."""
SETTLE_S = 10.0
"""Longest the sessions may take to be ``running`` once PostgreSQL resets no more: the
agent's reconnection (backoff capped at half a second) and the reconciler's re-applying
of a lost result (4 x DATABASE_TIMEOUT after it was stored), with room for a busy machine."""


@dataclass
class Served:
    """A served control plane with one agent, its dependency behind ``balancer``."""

    harness: Harness
    http: httpx.AsyncClient
    balancer: TcpBalancer
    sim: AgentSim


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/ready")).status_code == 200


async def _timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    response = await request
    return response, time.monotonic() - t0


@contextlib.asynccontextmanager
async def postgres_served(
    dsn: str, tmp_path: Path
) -> AsyncIterator[tuple[Harness, httpx.AsyncClient, TcpBalancer]]:
    """Serve a control plane on PostgreSQL behind a balancer, with a template, no agent."""
    parts = urlsplit(dsn)
    async with TcpBalancer([(parts.hostname or "127.0.0.1", parts.port or 5432)]) as pg:
        through = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{pg.port}"))
        settings = fast_settings(tmp_path / "home", database_timeout=DATABASE_TIMEOUT_S)
        async with (
            serve_control_plane(settings, PostgresStore(through, settings=settings)) as harness,
            harness.http() as http,
        ):
            await harness.template("desktop")
            yield harness, http, pg


@contextlib.asynccontextmanager
async def postgres_behind_balancer(dsn: str, tmp_path: Path) -> AsyncIterator[Served]:
    async with postgres_served(dsn, tmp_path) as (harness, http, pg):
        sim = await harness.agent("pg-agent", max_sessions=50)
        yield Served(harness, http, pg, sim)


@contextlib.asynccontextmanager
async def redis_behind_balancer(tmp_path: Path, prefix: str) -> AsyncIterator[Served]:
    async with TcpBalancer([REDIS]) as redis_lb:
        settings = fast_settings(
            tmp_path / "home",
            agent_hub_backend="redis",
            redis_url=f"redis://127.0.0.1:{redis_lb.port}/0",
            redis_key_prefix=prefix,
            pod_name="solo",
            internal_url="http://127.0.0.1:9",
        )
        store = SqliteStore(tmp_path / "home" / "streamspace.db")
        async with serve_control_plane(settings, store) as harness, harness.http() as http:
            await harness.template("desktop")
            sim = await harness.agent("redis-agent")
            yield Served(harness, http, redis_lb, sim)


async def _create(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post("/api/v1/sessions", json={"template": "desktop"})


@pytest.mark.asyncio
async def test_postgresql_slow_and_sliced_only_slows_requests(
    fresh_pg_dsn: str, tmp_path: Path
) -> None:
    async with postgres_behind_balancer(fresh_pg_dsn, tmp_path) as net:
        net.balancer.faults = Faults(latency_s=0.02, slice_bytes=7)
        created = await _create(net.http)
        assert created.status_code == 201, created.text
        await net.harness.wait_state(created.json()["id"], "running", timeout_s=15)
        rows = await net.harness.cp.store.list_commands(session_id=created.json()["id"])
        assert [(c.command_type, c.status) for c in rows] == [("start", "completed")]


@pytest.mark.asyncio
async def test_postgresql_black_hole_answers_503_within_the_timeout(
    fresh_pg_dsn: str, tmp_path: Path
) -> None:
    async with postgres_behind_balancer(fresh_pg_dsn, tmp_path) as net:
        before = await net.harness.session()
        await net.harness.wait_state(before.id, "running")
        net.balancer.faults.black_hole = True

        ready, took = await _timed(net.http.get("/ready"))
        assert ready.status_code == 503, ready.text
        assert ready.json()["problems"] == [
            "store unreachable: postgres: no answer within DATABASE_TIMEOUT"
        ]
        assert took < BOUND_S
        for request in (_create(net.http), net.http.get("/api/v1/sessions")):
            refused, took = await _timed(request)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "unavailable"
            assert took < BOUND_S
        assert net.harness.cp.hub.local("pg-agent") is not None

        net.balancer.faults.black_hole = False
        await eventually(lambda: _ready(net.http), timeout_s=5)
        created = await _create(net.http)
        assert created.status_code == 201, created.text
        await net.harness.wait_state(created.json()["id"], "running")
        again = await net.harness.cp.store.get_session(before.id)
        assert again is not None
        assert again.state == "running"
        assert net.sim.closed is not None
        assert not net.sim.closed.done()  # the same socket throughout
        assert net.sim.state.starts == 2


@pytest.mark.asyncio
async def test_postgresql_reset_mid_query_fails_requests_not_the_pool(
    fresh_pg_dsn: str, tmp_path: Path
) -> None:
    async with (
        postgres_served(fresh_pg_dsn, tmp_path) as (harness, http, pg),
        sdk_agent(harness, "pg-agent") as agent,
    ):
        host = agent.platform
        assert isinstance(host, MemoryPlatform)
        pg.cut()  # the pool reconnects, so every connection is counted from 0
        # Past the handshake and a few queries, so each connection dies mid-query.
        pg.faults.reset_after_bytes = 12_000
        statuses: list[int] = []
        while len(statuses) < 40 and (len(statuses) < 8 or 503 not in statuses):
            statuses.append((await _create(http)).status_code)
        pg.faults.reset_after_bytes = None
        t0 = time.monotonic()
        assert set(statuses) <= {201, 503}, statuses
        assert 503 in statuses, "no request was caught by a reset"

        await eventually(lambda: _ready(http), timeout_s=SETTLE_S)
        created = await _create(http)
        assert created.status_code == 201, created.text
        store = harness.cp.store
        sessions, _ = await store.list_sessions()
        assert len(sessions) >= statuses.count(201) + 1
        for session in sessions:
            left = SETTLE_S - (time.monotonic() - t0)
            await harness.wait_state(session.id, "running", timeout_s=max(left, 0.01))
        settled = time.monotonic() - t0
        print(f"{len(sessions)} sessions running {settled:.2f}s after the resets stopped")
        for session in sessions:
            commands = await store.list_commands(session_id=session.id)
            assert [(c.command_type, c.status) for c in commands] == [("start", "completed")]
            events = await store.list_session_events(session.id)
            assert "failed" not in [e.state for e in events], events
            started = [e for e in events if e.previous_state in ("scheduled", "starting")]
            assert len([e for e in started if e.state == "running"]) <= 1, events
        assert host.state.starts == len(host.state.sessions) == len(sessions)  # none twice


@pytest.mark.asyncio
async def test_redis_slow_still_registers_and_commands(tmp_path: Path, redis_prefix: str) -> None:
    async with redis_behind_balancer(tmp_path, redis_prefix) as net:
        net.balancer.faults = Faults(latency_s=0.02)
        late = await net.harness.agent("late-agent")
        session = await net.harness.session()
        await net.harness.wait_state(session.id, "running")
        assert len(net.sim.state.sessions) + len(late.state.sessions) == 1
        assert await _ready(net.http)


@pytest.mark.asyncio
async def test_redis_black_hole_is_reported_and_the_agent_served(
    tmp_path: Path, redis_prefix: str
) -> None:
    async with redis_behind_balancer(tmp_path, redis_prefix) as net:
        net.balancer.faults.black_hole = True
        session = await net.harness.session()
        ready, took = await _timed(net.http.get("/ready"))
        assert ready.status_code == 503, ready.text
        assert "redis unreachable" in ready.json()["problems"][0]
        assert "Timeout" in ready.json()["problems"][0]
        assert took < REDIS_TIMEOUT_S + 1.0
        await net.harness.wait_state(session.id, "running")  # the agent here is served
        assert net.harness.cp.hub.local("redis-agent") is not None

        net.balancer.faults.black_hole = False
        await eventually(lambda: _ready(net.http), timeout_s=5)


@pytest.mark.asyncio
async def test_redis_reset_resubscribes_the_inbox(tmp_path: Path, redis_prefix: str) -> None:
    async with redis_behind_balancer(tmp_path, redis_prefix) as net, _redis() as side:
        inbox = f"{redis_prefix}inbox:solo"
        assert await _subscribers(side, inbox) == 1
        accepted = net.balancer.accepted[REDIS]
        net.balancer.faults.reset_after_bytes = 1  # any byte more resets, new ones too
        await side.publish(inbox, json.dumps({"notice": "reconcile"}))  # resets the inbox's
        await eventually(lambda: _subscribers_are(side, inbox, 0), timeout_s=5)
        net.balancer.faults.reset_after_bytes = None
        await eventually(lambda: _subscribers_are(side, inbox, 1), timeout_s=5)
        assert net.balancer.accepted[REDIS] > accepted  # on a new connection
        await eventually(lambda: _ready(net.http), timeout_s=5)
        session = await net.harness.session()
        await net.harness.wait_state(session.id, "running")


@contextlib.asynccontextmanager
async def _redis() -> AsyncIterator[aioredis.Redis]:
    """A client of the real Redis, beside the balancer."""
    client = aioredis.Redis(host=REDIS[0], port=REDIS[1], decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _subscribers(client: aioredis.Redis, channel: str) -> int:
    [(_, count)] = await client.pubsub_numsub(channel)
    return int(count)


async def _subscribers_are(client: aioredis.Redis, channel: str, count: int) -> bool:
    return await _subscribers(client, channel) == count
