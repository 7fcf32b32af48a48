"""A simulated agent that speaks the real protocol over a real WebSocket.

It runs sessions on the SDK's :class:`~streamspace_sdk.testing.MemoryPlatform`, so the
platform invariants (idempotency on ``(session_id, generation)``) are the real ones, and it
keeps every frame it receives so tests can wait for them. Knobs let a test lose acks,
withhold results or stop heartbeating. Used by the control-plane tests and by
``bench/controlplane.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
import websockets
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamspace_controlplane.app import build_control_plane, create_app
from streamspace_controlplane.auth import new_agent_token
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import Session, Template
from streamspace_controlplane.services import sessions as session_service
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store.base import Store
from streamspace_sdk import Agent, AgentSettings
from streamspace_sdk.agent import Backoff
from streamspace_sdk.hooks import Hooks, Principal, make_plugin_manager
from streamspace_sdk.platform import Capacity, SessionStatus
from streamspace_sdk.protocol import (
    AgentHello,
    AgentWelcome,
    Command,
    CommandAck,
    CommandResult,
    Error,
    Frame,
    Heartbeat,
    SessionStatusReport,
    dump_frame,
    parse_frame,
)
from streamspace_sdk.settings import PluginSettings
from streamspace_sdk.testing import MemoryPlatform, MemoryPlatformState

__all__ = [
    "AgentSim",
    "Closed",
    "Harness",
    "Refused",
    "eventually",
    "fast_settings",
    "sdk_agent",
    "serve",
    "serve_control_plane",
]

WAIT_S = 10.0
"""Default bound on every wait; a test that hits it has found a bug, not a slow machine."""


def bind(host: str = "127.0.0.1") -> socket.socket:
    """Return a listening socket on a free port of ``host`` (to learn the port first)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    return sock


@contextlib.asynccontextmanager
async def serve(
    app: Any, host: str = "127.0.0.1", sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free port; yield its ``ws://host:port`` URL.

    Uses the sans-I/O ``websockets`` implementation (the legacy one is deprecated) with
    permessage-deflate off, as ``streamspace-controlplane serve`` does, and runs the app's
    lifespan, so the background loops run as in production. The socket is bound first, so
    a client that connects at once waits in the backlog until the app has started.
    """
    if sock is None:
        sock = bind(host)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"ws://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def eventually(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S, interval: float = 0.01
) -> None:
    """Wait until ``await predicate()`` is true, checking every ``interval`` seconds.

    For conditions nothing notifies about (a row in the store); prefer awaiting an event.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class Closed:
    """How the control plane closed the socket."""

    code: int
    reason: str


class Refused(Exception):
    """The control plane refused the agent: an HTTP status before the handshake, or a close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"refused with {code}: {reason}")
        self.code = code
        self.reason = reason


class AgentSim:
    """One simulated agent; :meth:`connect` it, then watch what it is sent.

    Args:
        url: Base URL of the control plane, ``ws://host:port``.
        token: The agent token, sent as ``Authorization: Bearer``.
        agent_id: The id it registers with.
        platform: Platform name it reports.
        region: Region it reports.
        labels: Labels it reports.
        max_sessions: Capacity it reports (and the memory platform enforces).
        fencing_epoch: Lease epoch it registers with.
        state: The "host" it runs on; pass the previous one to reconnect with its sessions.
        heartbeat: Send heartbeats at the interval the welcome asks for.
        path: Endpoint path.
        auto_execute: Ack, carry out and answer every command; else only record them.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        agent_id: str,
        *,
        platform: str = "memory",
        region: str = "default",
        labels: dict[str, str] | None = None,
        max_sessions: int = 10,
        fencing_epoch: int = 0,
        state: MemoryPlatformState | None = None,
        heartbeat: bool = True,
        path: str = "/api/v1/agents/connect",
        auto_execute: bool = True,
    ) -> None:
        self.url = url.rstrip("/") + path
        self.token = token
        self.agent_id = agent_id
        self.platform_name = platform
        self.region = region
        self.labels = dict(labels or {})
        self.fencing_epoch = fencing_epoch
        self.state = state if state is not None else MemoryPlatformState(max_sessions)
        self.platform = MemoryPlatform(agent_id=agent_id, state=self.state)
        self.heartbeat = heartbeat
        self.auto_execute = auto_execute
        self.drop_acks = 0
        """Deliveries to leave unanswered (no ack, result withheld in ``held``): a lost ack."""
        self.beats = 0
        """Heartbeats sent."""
        self.held: list[CommandResult] = []
        """Results withheld by ``drop_acks``; send them later to play a duplicate."""
        self.welcome: AgentWelcome | None = None
        self.frames: list[Frame] = []
        """Every text frame received, in order."""
        self.commands: list[Command] = []
        """Every command delivered, duplicates included."""
        self.errors: list[Error] = []
        """Every error frame received."""
        self.closed: asyncio.Future[Closed] | None = None
        """Resolves when the socket closes, with the control plane's code and reason."""
        self._ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()

    # -- connection ---------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        """Return the handshake headers (the bearer token, if any)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}

    async def hello(self, **overrides: Any) -> AgentHello:
        """Return the hello this agent sends, with its platform's sessions."""
        fields: dict[str, Any] = {
            "agent_id": self.agent_id,
            "platform": self.platform_name,
            "region": self.region,
            "labels": self.labels,
            "capacity": Capacity(max_sessions=self.state.max_sessions),
            "usage": await self.platform.usage(),
            "agent_version": "agentsim",
            "fencing_epoch": self.fencing_epoch,
            "sessions": await self.platform.list_sessions(),
        }
        fields.update(overrides)
        return AgentHello(**fields)

    async def open(self) -> ClientConnection:
        """Open the socket only (no hello); refusals before the handshake raise Refused."""
        try:
            self._ws = await websockets.connect(
                self.url,
                additional_headers=self.headers(),
                compression=None,
                open_timeout=WAIT_S,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            body = exc.response.body.decode(errors="replace") if exc.response.body else ""
            raise Refused(exc.response.status_code, body) from None
        self.closed = asyncio.get_running_loop().create_future()
        return self._ws

    async def connect(self, **hello_overrides: Any) -> AgentWelcome:
        """Open the socket, register, and start reading (and heartbeating).

        Raises:
            Refused: The control plane refused the token or the registration.
        """
        ws = await self.open()
        await ws.send(dump_frame(await self.hello(**hello_overrides)))
        try:
            async with asyncio.timeout(WAIT_S):
                first = await ws.recv()
        except ConnectionClosed as exc:
            await self._teardown()
            rcvd = exc.rcvd
            raise Refused(rcvd.code if rcvd else 1006, rcvd.reason if rcvd else "") from None
        frame = parse_frame(first)
        if not isinstance(frame, AgentWelcome):
            await self.close()
            raise AssertionError(f"expected agent.welcome, got {frame!r}")
        self.welcome = frame
        self._tasks.append(asyncio.create_task(self._read(ws)))
        if self.heartbeat:
            self._tasks.append(asyncio.create_task(self._beat(frame.heartbeat_interval_s)))
        return frame

    async def close(self) -> None:
        """Close the socket and stop every task."""
        if self._ws is not None:
            await self._ws.close()
        await self._teardown()

    async def _teardown(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._ws is not None:
            await self._ws.close()
            self._resolve_closed(self._ws)

    def _resolve_closed(self, ws: ClientConnection) -> None:
        if self.closed is not None and not self.closed.done():
            rcvd = ws.protocol.close_rcvd
            self.closed.set_result(Closed(rcvd.code, rcvd.reason) if rcvd else Closed(1006, ""))

    async def wait_closed(self, timeout_s: float = WAIT_S) -> Closed:
        """Return how the control plane closed the socket, once it has."""
        assert self.closed is not None, "not connected"
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(self.closed)

    # -- sending ------------------------------------------------------------------------

    async def send(self, frame: Frame | str | bytes) -> None:
        """Send a frame, or raw text or bytes."""
        assert self._ws is not None, "not connected"
        await self._ws.send(frame if isinstance(frame, str | bytes) else dump_frame(frame))

    async def send_heartbeat(self) -> None:
        """Send one heartbeat with the platform's usage."""
        await self.send(Heartbeat(usage=await self.platform.usage()))
        self.beats += 1
        async with self._changed:
            self._changed.notify_all()

    async def report(self, status: SessionStatus) -> None:
        """Send a ``session.status`` report."""
        await self.send(SessionStatusReport(status=status))

    async def ack(self, command: Command) -> None:
        """Acknowledge a command."""
        await self.send(CommandAck(command_id=command.command_id))

    async def execute(self, command: Command) -> CommandResult:
        """Carry out a command on the memory platform and return its result (not sent)."""
        return await self.platform.carry_out(command)

    # -- waiting ------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        """Wait until ``predicate()`` holds; checked whenever a frame arrives or a beat goes."""

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    async def next_command(self, after: int = 0, timeout_s: float = WAIT_S) -> Command:
        """Return the first command delivered after the first ``after`` ones."""
        await self.wait_for(lambda: len(self.commands) > after, timeout_s)
        return self.commands[after]

    async def command_for(self, session_id: str, action: str, timeout_s: float = WAIT_S) -> Command:
        """Return the first ``action`` command delivered for ``session_id``."""

        def found() -> Command | None:
            for command in self.commands:
                if (command.session_id, command.action) == (session_id, action):
                    return command
            return None

        await self.wait_for(lambda: found() is not None, timeout_s)
        command = found()
        assert command is not None
        return command

    async def next_error(self, after: int = 0, timeout_s: float = WAIT_S) -> Error:
        """Return the first error frame received after the first ``after`` ones."""
        await self.wait_for(lambda: len(self.errors) > after, timeout_s)
        return self.errors[after]

    # -- background ---------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                frame = parse_frame(message)
                if isinstance(frame, Command):
                    self.commands.append(frame)
                    if self.auto_execute:
                        await self._carry_out(frame)
                elif isinstance(frame, Error):
                    self.errors.append(frame)
                self.frames.append(frame)
                async with self._changed:
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self._resolve_closed(ws)
            async with self._changed:
                self._changed.notify_all()

    async def _carry_out(self, command: Command) -> None:
        if self.drop_acks > 0:
            self.drop_acks -= 1
            self.held.append(await self.execute(command))
            return
        await self.ack(command)
        await self.send(await self.execute(command))

    async def _beat(self, interval_s: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval_s)
                await self.send_heartbeat()


def fast_settings(home: Any, **overrides: Any) -> ControlPlaneSettings:
    """Return settings with every interval short, so timing-driven behaviour shows quickly."""
    values: dict[str, Any] = {
        "streamspace_home": home,
        "jwt_secret": "x" * 40,
        "admin_password": "admin-password-for-tests",
        "reconcile_interval": "100ms",
        "command_ack_timeout": "200ms",
        "agent_heartbeat_timeout": "3s",
        "lost_grace_period": "300ms",
        "max_sessions_per_user": 100,
    }
    values.update(overrides)
    return ControlPlaneSettings(**values)


class Harness:
    """A served control plane and the agents connected to it, for tests and benchmarks."""

    def __init__(self, cp: ControlPlane, url: str) -> None:
        self.cp = cp
        self.url = url
        self.sims: list[AgentSim] = []
        self._tokens: dict[str, str] = {}

    async def token(self, agent_id: str) -> str:
        """Return a token for ``agent_id``, stored (hashed) on first use."""
        if agent_id not in self._tokens:
            token, record = new_agent_token(agent_id)
            await self.cp.store.create_agent_token(record)
            self._tokens[agent_id] = token
        return self._tokens[agent_id]

    async def agent(
        self, agent_id: str, *, connect: bool = True, token: str | None = None, **options: Any
    ) -> AgentSim:
        """Return a simulated agent (connected, unless ``connect=False``); closed at the end."""
        sim = AgentSim(self.url, token or await self.token(agent_id), agent_id, **options)
        self.sims.append(sim)
        if connect:
            await sim.connect()
        return sim

    async def template(self, name: str = "desktop", **fields: Any) -> Template:
        """Store a template."""
        fields.setdefault("image", "example/desktop:1")
        return await self.cp.store.create_template(Template(name=name, **fields))

    async def session(
        self, template: str = "desktop", user: str = "alice", **options: Any
    ) -> Session:
        """Create a session the way the REST API does (which kicks the scheduler)."""
        return await session_service.create_session(
            self.cp, Principal(username=user, role="user"), template, **options
        )

    async def wait_state(self, session_id: str, *states: str, timeout_s: float = WAIT_S) -> Session:
        """Return the session once it is in one of ``states``, waiting on its events."""
        events = self.cp.events.subscribe(session_id)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    session = await self.cp.store.get_session(session_id)
                    if session is not None and session.state in states:
                        return session
                    await events.get()
        except TimeoutError:
            session = await self.cp.store.get_session(session_id)
            found = "gone" if session is None else f"{session.state} ({session.reason!r})"
            raise AssertionError(
                f"session {session_id} not in {states} after {timeout_s}s: {found}"
            ) from None
        finally:
            self.cp.events.unsubscribe(session_id, events)

    @contextlib.asynccontextmanager
    async def http(self, timeout_s: float = WAIT_S) -> AsyncIterator[httpx.AsyncClient]:
        """Yield an HTTP client of the REST API, logged in as the bootstrap admin."""
        base = "http" + self.url.removeprefix("ws")
        async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as http:
            login = await http.post(
                "/api/v1/auth/login",
                json={"username": "admin", "password": "admin-password-for-tests"},
            )
            assert login.status_code == 200, login.text
            http.headers["Authorization"] = f"Bearer {login.json()['token']}"
            yield http

    async def close(self) -> None:
        """Close every agent."""
        for sim in self.sims:
            await sim.close()


@contextlib.asynccontextmanager
async def serve_control_plane(
    settings: ControlPlaneSettings, store: Store, sock: socket.socket | None = None
) -> AsyncIterator[Harness]:
    """Build a control plane on ``store`` (no hook plugins), serve it (on ``sock`` if
    given), yield a :class:`Harness`."""
    hooks = Hooks(
        make_plugin_manager(
            settings=PluginSettings(streamspace_load_plugins=""), load_entrypoints=False
        )
    )
    cp = build_control_plane(settings, store=store, hooks=hooks)
    async with serve(create_app(cp), sock=sock) as url:
        harness = Harness(cp, url)
        try:
            yield harness
        finally:
            await harness.close()


@contextlib.asynccontextmanager
async def sdk_agent(
    harness: Harness,
    agent_id: str,
    *,
    url: str | None = None,
    backoff: Backoff | None = None,
    **settings: Any,
) -> AsyncIterator[Agent]:
    """Run the SDK's real agent on a memory platform against ``harness`` (or ``url``, a
    proxy in front of it), without plugins; yield it once registered, stop it after.

    ``settings`` are :class:`AgentSettings` fields on top of fast test defaults.
    """
    fields: dict[str, Any] = {"health_port": 0, "heartbeat_interval": 0.5, "max_sessions": 50}
    fields |= settings
    agent = Agent(
        AgentSettings(
            agent_id=agent_id,
            control_plane_url=url or harness.url,
            agent_token=SecretStr(await harness.token(agent_id)),
            platform="memory",
            **fields,
        ),
        MemoryPlatform(agent_id=agent_id, state=MemoryPlatformState(fields["max_sessions"])),
        hooks=Hooks(
            make_plugin_manager(
                settings=PluginSettings(streamspace_load_plugins=""), load_entrypoints=False
            )
        ),
        backoff=backoff or Backoff(base_s=0.05, cap_s=0.5, reset_after_s=60.0),
    )
    task = asyncio.create_task(agent.serve())

    async def registered() -> bool:
        return agent.connection_id is not None

    try:
        await eventually(registered)
        yield agent
    finally:
        await agent.stop()
        await task
