"""``FakeControlPlane``: a real WebSocket server that speaks the agent protocol, for tests.

It listens on ``127.0.0.1`` on a free port, checks the bearer token, answers
``agent.hello`` with ``agent.welcome`` (or refuses it with a close code, as the real control
plane does), keeps every frame the agent sends, and lets a test send commands, malformed
frames and ``shutdown``, or drop the connection. Waiting is event-driven: ``wait_for`` and
``next_frame`` return as soon as the frame arrives, so tests never sleep::

    async with FakeControlPlane(token="t0ken") as fake:
        agent = Agent(
            AgentSettings(
                agent_id="a1", control_plane_url=fake.url, agent_token="t0ken", health_port=0
            ),
            platform=platform,
        )
        task = asyncio.create_task(agent.serve())
        await fake.wait_registered()
        command = await fake.command("start", "s1")
        result = await fake.next_frame(CommandResult)
        await agent.stop()
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self, TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import ProtocolError
from streamspace_sdk.platform import Action, SessionSpec
from streamspace_sdk.protocol import (
    MAX_TEXT_FRAME_BYTES,
    AgentHello,
    AgentWelcome,
    Command,
    Frame,
    Shutdown,
    dump_frame,
    error_frame,
    parse_frame,
)

__all__ = ["FakeConnection", "FakeControlPlane"]

F = TypeVar("F", bound=WireModel)

AGENT_PATH = "/api/v1/agents/connect"
WAIT_S = 10.0
"""Default bound on every wait: a test that reaches it has found a bug, not a slow machine."""


class FakeConnection:
    """One WebSocket an agent opened to the :class:`FakeControlPlane`."""

    def __init__(self, ws: ServerConnection, conn_id: str) -> None:
        self.ws = ws
        self.conn_id = conn_id
        """The ``connection_id`` the welcome carries."""
        self.headers: Headers = ws.request.headers if ws.request is not None else Headers()
        """The handshake's request headers (names are case-insensitive)."""
        self.hello: AgentHello | None = None
        """The agent's first frame, once it is a valid hello."""
        self.registered = False
        """Whether it was welcomed."""
        self.frames: list[Frame] = []
        """Every valid text frame the agent sent on it, the hello first."""
        self.bad_frames: list[str | bytes] = []
        """Frames that did not parse (answered with an ``error`` frame), and binary frames."""
        self.closed = False
        """Whether the socket is closed."""
        self.close_code: int | None = None
        """The close code, once closed (1006 when the TCP connection just went away)."""
        self.close_reason = ""
        """The close reason, once closed."""

    def __repr__(self) -> str:
        state = f"closed {self.close_code}" if self.closed else "open"
        return f"<FakeConnection {self.conn_id} {state}, {len(self.frames)} frames>"


class FakeControlPlane:
    """A control plane an agent under test can dial: ``async with FakeControlPlane() as fake``.

    Contract, as the real agent endpoint:

    * ``GET`` on :attr:`path` without ``Authorization: Bearer <token>`` is refused with HTTP
      401 before the handshake (any token passes when ``token`` is ``None``);
    * the first frame must be ``agent.hello`` (else close 4400); an ``agent_id`` other than
      the expected one closes 4403; a fencing epoch below the highest accepted so far for
      that agent closes 4409; a newer registration of an agent closes its older socket 4000;
    * an accepted hello is answered with ``agent.welcome`` carrying
      :attr:`heartbeat_interval_s`; frames that fail :func:`parse_frame` are answered with an
      ``error`` frame and the connection stays up.

    It never executes anything: a test sends commands and reads what the agent answers.

    Args:
        token: the agent token to require; ``None`` accepts any (or none).
        agent_id: the agent id the token belongs to; ``None`` accepts any.
        heartbeat_interval_s: what the welcome asks for. Short (0.05 s) so that tests see
            heartbeats and status polls quickly.
        path: the endpoint path.
    """

    def __init__(
        self,
        *,
        token: str | None = "test-agent-token",
        agent_id: str | None = None,
        heartbeat_interval_s: float = 0.05,
        path: str = AGENT_PATH,
    ) -> None:
        self.token = token
        self.agent_id = agent_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.path = path
        self.connections: list[FakeConnection] = []
        """Every connection accepted, in order (registered or not)."""
        self.frames: list[Frame] = []
        """Every valid text frame agents sent, on any connection, in order."""
        self.http_refusals: list[int] = []
        """The HTTP statuses refused handshakes were answered with, in order."""
        self.current: FakeConnection | None = None
        """The registered connection that is open now, if any."""
        self._server: Server | None = None
        self._port = 0
        self._ids = itertools.count(1)
        self._commands = itertools.count(1)
        self._refuse_http: list[int] = []
        self._refuse_http_always: int | None = None
        self._refuse_registration: list[tuple[int, str]] = []
        self._epochs: dict[str, int] = {}
        self._cursors: dict[type[Any], int] = {}
        self._changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Self:
        """Start listening on a free port of ``127.0.0.1``."""
        self._server = await serve(
            self._serve,
            "127.0.0.1",
            0,
            compression=None,
            process_request=self._check_request,
            max_size=MAX_TEXT_FRAME_BYTES,
        )
        self._port = int(next(iter(self._server.sockets)).getsockname()[1])
        return self

    async def close(self) -> None:
        """Close every connection (1001) and stop listening."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The base URL to give an agent as ``CONTROL_PLANE_URL`` (``ws://127.0.0.1:<port>``)."""
        if not self._port:
            raise RuntimeError("the FakeControlPlane is not started")
        return f"ws://127.0.0.1:{self._port}"

    # -- what the agent sent -----------------------------------------------------------------

    @property
    def registrations(self) -> list[FakeConnection]:
        """The connections that were welcomed, in order."""
        return [c for c in self.connections if c.registered]

    @property
    def hellos(self) -> list[AgentHello]:
        """Every valid hello received, accepted or refused, in order."""
        return [c.hello for c in self.connections if c.hello is not None]

    def frames_of(self, kind: type[F]) -> list[F]:
        """Return every frame of ``kind`` received so far, in order."""
        return [f for f in self.frames if isinstance(f, kind)]

    async def wait_for(self, predicate: Callable[[], object], timeout_s: float = WAIT_S) -> None:
        """Return once ``predicate()`` is true; it is checked whenever something happens.

        Raises:
            TimeoutError: it stayed false for ``timeout_s``; the message lists what arrived.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    changed = self._changed
                    if predicate():
                        return
                    await changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"condition not met within {timeout_s:g}s; connections: {self.connections}; "
                f"frames: {[f.type for f in self.frames][-30:]}"
            ) from None

    async def next_frame(self, kind: type[F], timeout_s: float = WAIT_S) -> F:
        """Return the next frame of ``kind`` that no earlier ``next_frame(kind)`` returned."""
        found: list[F] = []

        def look() -> bool:
            start = self._cursors.get(kind, 0)
            for index in range(start, len(self.frames)):
                frame = self.frames[index]
                if isinstance(frame, kind):
                    self._cursors[kind] = index + 1
                    found.append(frame)
                    return True
            self._cursors[kind] = len(self.frames)
            return False

        await self.wait_for(look, timeout_s)
        return found[0]

    async def wait_registered(self, count: int = 1, timeout_s: float = WAIT_S) -> FakeConnection:
        """Return the ``count``-th welcomed connection (1-based), once there is one."""
        await self.wait_for(lambda: len(self.registrations) >= count, timeout_s)
        return self.registrations[count - 1]

    async def wait_closed(
        self, connection: FakeConnection, timeout_s: float = WAIT_S
    ) -> FakeConnection:
        """Return ``connection`` once it is closed."""
        await self.wait_for(lambda: connection.closed, timeout_s)
        return connection

    # -- what the test does ------------------------------------------------------------------

    def refuse_http(self, status: int = 401, *, times: int | None = 1) -> None:
        """Refuse the next ``times`` handshakes with HTTP ``status``; ``None``: until
        :meth:`stop_refusing`."""
        if times is None:
            self._refuse_http_always = status
        else:
            self._refuse_http.extend([status] * times)
        self._notify()

    def refuse_registration(self, code: int = 4409, reason: str = "", *, times: int = 1) -> None:
        """Answer the next ``times`` valid hellos by closing with ``code`` (e.g. 4409, 4400)."""
        self._refuse_registration.extend([(code, reason or f"refused with {code}")] * times)

    def stop_refusing(self) -> None:
        """Forget every pending refusal."""
        self._refuse_http.clear()
        self._refuse_http_always = None
        self._refuse_registration.clear()

    async def send(self, frame: WireModel | str | bytes, to: FakeConnection | None = None) -> None:
        """Send a frame, or raw text or bytes, on ``to`` (by default the current connection).

        Raises:
            RuntimeError: no agent is connected.
        """
        conn = to if to is not None else self.current
        if conn is None:
            raise RuntimeError("no agent is connected to the FakeControlPlane")
        await conn.ws.send(frame if isinstance(frame, str | bytes) else dump_frame(frame))

    async def command(
        self,
        action: Action = "start",
        session_id: str = "s1",
        generation: int = 1,
        *,
        spec: SessionSpec | None = None,
        command_id: str | None = None,
        to: FakeConnection | None = None,
        **spec_fields: Any,
    ) -> Command:
        """Send a command and return it.

        ``start`` and ``wake`` get ``spec``, or one built for the session and generation from
        ``user="alice"``, ``template="desktop"`` and ``spec_fields``.
        """
        if spec is None and action in ("start", "wake"):
            fields: dict[str, Any] = {"user": "alice", "template": "desktop", **spec_fields}
            spec = SessionSpec(session_id=session_id, generation=generation, **fields)
        command = Command(
            command_id=command_id or f"cmd-{next(self._commands)}",
            session_id=session_id,
            generation=generation,
            action=action,
            spec=spec,
        )
        await self.send(command, to)
        return command

    async def shutdown(
        self, reason: str = "control plane restarting", reconnect_after_s: float | None = 0.0
    ) -> None:
        """Send ``shutdown`` on the current connection, then close it (1001), as a deploy does."""
        conn = self.current
        await self.send(Shutdown(reason=reason, reconnect_after_s=reconnect_after_s))
        if conn is not None:
            await conn.ws.close(1001, reason)

    async def drop(self, code: int | None = None, reason: str = "") -> None:
        """End the current connection: with a close ``code``, or abruptly (TCP reset, 1006)
        when ``code`` is ``None``, as a network failure would."""
        conn = self.current
        if conn is None:
            raise RuntimeError("no agent is connected to the FakeControlPlane")
        if code is None:
            conn.ws.transport.abort()
        else:
            await conn.ws.close(code, reason)
        await self.wait_closed(conn)

    # -- the server --------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != self.path:
            return self._refusal(connection, HTTPStatus.NOT_FOUND, "not_found", "no such path")
        status = self._refuse_http.pop(0) if self._refuse_http else self._refuse_http_always
        if status is not None:
            return self._refusal(connection, status, "refused", "refused by the test")
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return self._refusal(connection, 401, "unauthorized", "invalid agent token")
        return None

    def _refusal(
        self, connection: ServerConnection, status: int, code: str, message: str
    ) -> Response:
        self.http_refusals.append(status)
        self._notify()
        body = json.dumps({"error": {"code": code, "message": message}})
        response = connection.respond(status, body)
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    async def _serve(self, ws: ServerConnection) -> None:
        conn = FakeConnection(ws, f"fake-{next(self._ids)}")
        self.connections.append(conn)
        self._notify()
        try:
            if await self._register(conn):
                await self._receive(conn)
        except ConnectionClosed:
            pass
        finally:
            conn.closed = True
            code = ws.protocol.close_code  # websockets 13 has no ws.close_code
            conn.close_code = code if code is not None else 1006
            conn.close_reason = ws.protocol.close_reason or ""
            if self.current is conn:
                self.current = None
            self._notify()

    async def _register(self, conn: FakeConnection) -> bool:
        ws = conn.ws
        first = await ws.recv()
        try:
            hello = parse_frame(first)
        except ProtocolError as exc:
            await ws.close(4400, f"expected agent.hello: {exc.code}")
            return False
        if not isinstance(hello, AgentHello):
            await ws.close(4400, f"expected agent.hello first, got {hello.type}")
            return False
        conn.hello = hello
        self._record(conn, hello)
        if self.agent_id is not None and hello.agent_id != self.agent_id:
            await ws.close(4403, f"token is for agent {self.agent_id!r}")
            return False
        if self._refuse_registration:
            code, reason = self._refuse_registration.pop(0)
            await ws.close(code, reason)
            return False
        highest = self._epochs.get(hello.agent_id, 0)
        if hello.fencing_epoch < highest:
            await ws.close(4409, f"stale fencing epoch {hello.fencing_epoch} < {highest}")
            return False
        self._epochs[hello.agent_id] = hello.fencing_epoch
        old = self.current
        await ws.send(
            dump_frame(
                AgentWelcome(
                    connection_id=conn.conn_id, heartbeat_interval_s=self.heartbeat_interval_s
                )
            )
        )
        conn.registered = True
        self.current = conn
        self._notify()
        if (
            old is not None
            and not old.closed
            and old.hello is not None
            and old.hello.agent_id == hello.agent_id
        ):
            await old.ws.close(4000, "superseded by a newer connection")
        return True

    async def _receive(self, conn: FakeConnection) -> None:
        async for message in conn.ws:
            if isinstance(message, bytes):
                conn.bad_frames.append(message)
                self._notify()
                continue
            try:
                frame = parse_frame(message)
            except ProtocolError as exc:
                conn.bad_frames.append(message)
                self._notify()
                await conn.ws.send(dump_frame(error_frame(exc)))
                continue
            self._record(conn, frame)

    def _record(self, conn: FakeConnection, frame: Frame) -> None:
        conn.frames.append(frame)
        self.frames.append(frame)
        self._notify()
