"""The agent's link under network faults, through a :class:`TcpBalancer` between a real
agent (the SDK's :class:`Agent` on a memory platform) and a served control plane.

Expected outcomes, one test each:

- black hole (the peer vanishes, nothing is reset): the agent notices within
  ``WS_PING_INTERVAL`` + ``WS_PING_TIMEOUT``, reconnects once the network is back, and a
  command issued meanwhile is delivered then, and applied once;
- reset: the agent reconnects at once and commands flow again;
- latency and slicing: nothing breaks, only slows down.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentsim import Harness, eventually, fast_settings, sdk_agent, serve_control_plane

from streamspace_controlplane.store.base import Store
from streamspace_sdk import Agent
from streamspace_sdk.agent import Backoff
from streamspace_sdk.testing import Faults, TcpBalancer

AGENT_ID = "faulty-net"
PING_S = 0.3
"""WS_PING_INTERVAL and WS_PING_TIMEOUT of the agent in these tests."""


@dataclass
class Link:
    harness: Harness
    agent: Agent
    balancer: TcpBalancer


@contextlib.asynccontextmanager
async def link(store: Store, tmp_path: Path) -> AsyncIterator[Link]:
    async with serve_control_plane(fast_settings(tmp_path / "home"), store) as harness:
        port = int(harness.url.rsplit(":", 1)[1])
        async with (
            TcpBalancer([("127.0.0.1", port)]) as balancer,
            sdk_agent(
                harness,
                AGENT_ID,
                url=f"ws://127.0.0.1:{balancer.port}",
                backoff=Backoff(base_s=0.05, cap_s=0.2, reset_after_s=60.0),
                ws_ping_interval=PING_S,
                ws_ping_timeout=PING_S,
            ) as agent,
        ):
            agent.open_timeout_s = 1.0  # a handshake lost in the black hole is retried soon
            await harness.template("desktop", platform="memory")
            yield Link(harness, agent, balancer)


def _registered(agent: Agent, other_than: str | None = None) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return agent.connection_id is not None and agent.connection_id != other_than

    return check


async def _commands(harness: Harness, session_id: str) -> list[tuple[str, str]]:
    rows = await harness.cp.store.list_commands(session_id=session_id)
    return [(c.command_type, c.status) for c in rows]


@pytest.mark.asyncio
async def test_a_black_hole_is_noticed_within_the_ping_bounds_and_nothing_is_lost(
    sqlite_store: Store, tmp_path: Path
) -> None:
    async with link(sqlite_store, tmp_path) as net:
        first = net.agent.connection_id
        net.balancer.faults.black_hole = True
        t0 = time.monotonic()
        session = await net.harness.session()  # its start is sent into the black hole
        await eventually(lambda: _not_registered(net.agent), timeout_s=5)
        noticed = time.monotonic() - t0
        assert noticed < 2 * PING_S + 0.5
        net.balancer.faults.black_hole = False
        await eventually(_registered(net.agent, other_than=first), timeout_s=10)
        await net.harness.wait_state(session.id, "running", timeout_s=10)
        assert await _commands(net.harness, session.id) == [("start", "completed")]


async def _not_registered(agent: Agent) -> bool:
    return agent.connection_id is None


@pytest.mark.asyncio
async def test_a_reset_reconnects_at_once_and_commands_flow(
    sqlite_store: Store, tmp_path: Path
) -> None:
    async with link(sqlite_store, tmp_path) as net:
        first = net.agent.connection_id
        assert net.balancer.cut() == 1
        await eventually(_registered(net.agent, other_than=first), timeout_s=5)
        session = await net.harness.session()
        await net.harness.wait_state(session.id, "running", timeout_s=10)


@pytest.mark.asyncio
async def test_latency_and_slicing_slow_the_link_without_breaking_it(
    sqlite_store: Store, tmp_path: Path
) -> None:
    async with link(sqlite_store, tmp_path) as net:
        first = net.agent.connection_id
        net.balancer.faults = Faults(latency_s=0.05, slice_bytes=7)
        session = await net.harness.session()
        await net.harness.wait_state(session.id, "running", timeout_s=10)
        assert net.agent.connection_id == first  # the same socket throughout
