"""Simulated agents for load benchmarks: the real protocol and the SDK's backoff, no platform.

A :class:`SimAgent` does what the connection loop of ``streamspace_sdk.Agent`` does, at a
fraction of its cost, so that one process can hold thousands: it dials the control plane's
agent socket with its token, sends ``agent.hello`` listing what its
:class:`~streamspace_sdk.testing.MemoryPlatform` runs (so a reconnect reports its sessions),
waits for ``agent.welcome``, heartbeats at the interval it is told, acknowledges each
``command``, carries it out on the memory platform and answers with ``command.result``.
When a dial fails or the socket closes it waits :meth:`Backoff.delay` of the SDK's own
:class:`~streamspace_sdk.agent.Backoff` (full jitter) and dials again, counting attempts as
the SDK does (a connection that lasted ``reset_after_s`` starts the count again; superseded
or duplicate refusals wait ``cap_s``; ``shutdown`` waits what it says plus jitter). Every
frame is a model of ``streamspace_sdk.protocol``, written with ``dump_frame`` and read with
``parse_frame``. What it leaves out: leases, health port, status polling, VNC streams.

A :class:`Fleet` holds them and says when they have registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from streamspace_sdk.agent import AGENT_PATH, Backoff
from streamspace_sdk.errors import ProtocolError
from streamspace_sdk.platform import Capacity
from streamspace_sdk.protocol import (
    MAX_TEXT_FRAME_BYTES,
    AgentHello,
    AgentWelcome,
    Command,
    CommandAck,
    Heartbeat,
    Shutdown,
    dump_frame,
    parse_frame,
)
from streamspace_sdk.testing import MemoryPlatform, MemoryPlatformState

__all__ = ["Fleet", "SimAgent"]

OPEN_TIMEOUT_S = 10.0
"""The SDK agent's ``open_timeout_s``: TCP and WebSocket handshakes together."""
WELCOME_TIMEOUT_S = 10.0
"""The SDK agent's ``welcome_timeout_s``."""
SUPERSEDED, DUPLICATE = 4000, 4429
"""Close codes after which the SDK agent waits ``Backoff.cap_s`` rather than backing off."""


class SimAgent:
    """One simulated agent; :meth:`start` runs its connection loop until :meth:`stop`.

    Args:
        fleet: The fleet it reports to.
        agent_id: The id it registers with.
        token: Its agent token, sent as ``Authorization: Bearer``.
        max_sessions: The capacity it reports (the memory platform enforces it).
    """

    def __init__(self, fleet: Fleet, agent_id: str, token: str, *, max_sessions: int) -> None:
        self.fleet = fleet
        self.agent_id = agent_id
        self.headers = {"Authorization": f"Bearer {token}"}
        self.state = MemoryPlatformState(max_sessions)
        self.platform = MemoryPlatform(agent_id=agent_id, state=self.state)
        self.registered_at: float | None = None
        """``time.perf_counter()`` at the last ``agent.welcome``; ``None`` before the first."""
        self.dials = 0
        """Connection attempts made."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the connection loop (its first dial goes at once, as the SDK's does)."""
        self._task = asyncio.create_task(self._connect_forever(), name=f"sim {self.agent_id}")

    async def stop(self) -> None:
        """Stop the loop, closing the socket."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _connect_forever(self) -> None:
        backoff = self.fleet.backoff
        attempt = 0
        while True:
            lasted_s, wait_s = await self._connect_once()
            if lasted_s > backoff.reset_after_s:
                attempt = 0
            if wait_s is None:
                wait_s = backoff.delay(attempt, self.fleet.rng)
                attempt += 1
            await asyncio.sleep(wait_s)

    async def _connect_once(self) -> tuple[float, float | None]:
        """Dial, register and serve until the socket closes; return how long it was
        registered and the wait the control plane asked for (``None``: back off)."""
        self.dials += 1
        hello = AgentHello(
            agent_id=self.agent_id,
            platform=self.platform.name,
            capacity=Capacity(max_sessions=self.state.max_sessions),
            usage=await self.platform.usage(),
            agent_version="bench-sim",
            instance_id=f"bench-sim:{self.agent_id}",
            sessions=await self.platform.list_sessions(),
        )
        try:
            ws = await connect(
                self.fleet.url,
                additional_headers=self.headers,
                compression=None,
                open_timeout=OPEN_TIMEOUT_S,
                close_timeout=2,
                max_size=MAX_TEXT_FRAME_BYTES,
            )
        except (OSError, TimeoutError, WebSocketException):
            self.fleet.failed_dials += 1
            return 0.0, None
        registered_at: float | None = None
        beat: asyncio.Task[None] | None = None
        try:
            await ws.send(dump_frame(hello))
            welcome = await self._await_welcome(ws)
            registered_at = time.perf_counter()
            self.fleet.registered(self, registered_at)
            beat = asyncio.create_task(self._beat(ws, welcome.heartbeat_interval_s))
            wait = await self._serve(ws)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            wait = self.fleet.backoff.cap_s if code in (SUPERSEDED, DUPLICATE) else None
        except TimeoutError:  # no welcome
            wait = None
        finally:
            if beat is not None:
                beat.cancel()
            if registered_at is not None:
                self.fleet.unregistered(self)
            if self.fleet.stopping:
                ws.transport.abort()
            else:
                await ws.close()
        lasted_s = time.perf_counter() - registered_at if registered_at is not None else 0.0
        return lasted_s, wait

    async def _await_welcome(self, ws: ClientConnection) -> AgentWelcome:
        async with asyncio.timeout(WELCOME_TIMEOUT_S):
            while True:
                message = await ws.recv()
                if isinstance(message, str):
                    with contextlib.suppress(ProtocolError):
                        frame = parse_frame(message)
                        if isinstance(frame, AgentWelcome):
                            return frame

    async def _serve(self, ws: ClientConnection) -> float | None:
        """Answer frames until the socket closes (raising) or the control plane shuts down."""
        async for message in ws:
            if isinstance(message, bytes):
                continue
            try:
                frame = parse_frame(message)
            except ProtocolError:
                continue
            if isinstance(frame, Command):
                self.fleet.delivered(frame)
                await ws.send(dump_frame(CommandAck(command_id=frame.command_id)))
                await ws.send(dump_frame(await self.platform.carry_out(frame)))
            elif isinstance(frame, Shutdown):
                await ws.close(1000, "control plane shutting down")
                if frame.reconnect_after_s is None:
                    return None
                return frame.reconnect_after_s + self.fleet.rng.uniform(
                    0, self.fleet.backoff.base_s
                )
        return None

    async def _beat(self, ws: ClientConnection, interval_s: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval_s)
                await ws.send(dump_frame(Heartbeat(usage=await self.platform.usage())))
                self.fleet.beats += 1


class Fleet:
    """Simulated agents of one control plane, and what they have seen.

    Args:
        base_url: The control plane's ``ws://host:port`` (or a balancer in front of it).
        backoff: The waits between attempts; the SDK agent's defaults unless given.
        seed: Seed of the jitter, for repeatable runs.
    """

    def __init__(self, base_url: str, backoff: Backoff | None = None, seed: int = 0) -> None:
        self.url = base_url.rstrip("/") + AGENT_PATH
        self.backoff = backoff if backoff is not None else Backoff()
        self.rng = random.Random(seed)
        self.agents: dict[str, SimAgent] = {}
        self.online: set[str] = set()
        """Agents registered now (welcomed, socket open)."""
        self.failed_dials = 0
        """Dials that failed before the WebSocket opened (refused, reset, timed out)."""
        self.beats = 0
        """Heartbeats sent."""
        self.commands = 0
        """Commands delivered."""
        self.stopping = False
        self._since: set[str] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._expected: dict[tuple[str, str], asyncio.Future[float]] = {}

    def add(self, agent_id: str, token: str, *, max_sessions: int) -> SimAgent:
        """Add an agent (not started)."""
        sim = SimAgent(self, agent_id, token, max_sessions=max_sessions)
        self.agents[agent_id] = sim
        return sim

    def start(self, agents: Iterable[SimAgent] | None = None) -> None:
        """Start the connection loops of ``agents`` (all by default), all at once."""
        for sim in agents if agents is not None else self.agents.values():
            sim.start()

    async def stop(self) -> None:
        """Stop every agent, dropping its socket."""
        self.stopping = True
        await asyncio.gather(*(sim.stop() for sim in self.agents.values()))

    # -- registration --------------------------------------------------------------------

    def mark(self) -> None:
        """Start counting registrations afresh: :meth:`wait_registered` counts from here."""
        self._since = set()

    async def wait_registered(self, count: int, timeout_s: float) -> None:
        """Wait until ``count`` distinct agents have registered since :meth:`mark`."""
        if len(self._since) >= count:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((count, waiter))
        async with asyncio.timeout(timeout_s):
            await waiter

    def registered(self, sim: SimAgent, at: float) -> None:
        """Note that ``sim`` was welcomed at ``at`` (``time.perf_counter()``)."""
        sim.registered_at = at
        self.online.add(sim.agent_id)
        self._since.add(sim.agent_id)
        done = [w for w in self._waiters if w[0] <= len(self._since)]
        for waiter in done:
            self._waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(None)

    def unregistered(self, sim: SimAgent) -> None:
        """Note that ``sim``'s registered socket closed."""
        self.online.discard(sim.agent_id)

    # -- commands ------------------------------------------------------------------------

    def expect(self, session_id: str, action: str) -> asyncio.Future[float]:
        """Return a future of the ``time.perf_counter()`` at which the next ``action`` for
        ``session_id`` reaches its agent. (Not the loop's clock: uvloop's counts whole
        milliseconds.)"""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._expected[(session_id, action)] = future
        return future

    def delivered(self, command: Command) -> None:
        """Note a command an agent received."""
        self.commands += 1
        future = self._expected.pop((command.session_id, command.action), None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())
