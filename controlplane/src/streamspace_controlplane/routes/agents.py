"""The agent WebSocket: ``/api/v1/agents/connect``, also served at ``/agent/ws`` and
``/api/v1/agents/hub`` (:data:`~streamspace_sdk.protocol.AGENT_PATHS`).

An agent dials out to this endpoint with ``Authorization: Bearer <agent token>``; the token is
checked before the socket is accepted. Its first frame must be ``agent.hello`` naming the
token's agent, within :data:`HELLO_TIMEOUT_S`. After ``agent.welcome`` every text frame goes
through :func:`~streamspace_sdk.protocol.parse_frame`; a frame that fails is answered with an
``error`` frame and the connection stays up.

Close codes: 4000 superseded by a newer connection of the same agent, 4400 bad hello or
protocol version, 4401 no valid token (refused as HTTP 401 before the handshake where the
server supports denial responses, else HTTP 403), 4403 token of another agent, 4408 no hello
or no heartbeat in time, 4409 stale fencing epoch, 4429 another live process of the agent.
1013 (the store is unavailable) and 1011 (an unexpected failure) close a socket whose ack,
result or status report could not be recorded: the agent reconnects, and the registration
catches it up, so the frame is sent again rather than lost.

Serve with permessage-deflate off (uvicorn ``ws_per_message_deflate=False``, as ``serve``
does): agent frames are small and frequent, and compression costs more CPU and memory per
socket than it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import cast

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from streamspace_controlplane import auth
from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.http import deny_websocket
from streamspace_controlplane.routes import streams
from streamspace_controlplane.services import registry
from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import ProtocolError, StreamSpaceError
from streamspace_sdk.protocol import (
    AGENT_PATHS,
    AgentHello,
    Error,
    VncClose,
    VncCredit,
    VncOpened,
    dump_frame,
    error_frame,
    parse_frame,
)
from streamspace_sdk.transports.dedicated import DedicatedTransport
from streamspace_sdk.transports.mux import MuxStreams, MuxTransport

__all__ = ["AGENT_PATHS", "HELLO_TIMEOUT_S", "OFFERED_TRANSPORTS", "AgentSocket", "routes"]

logger = logging.getLogger("streamspace.controlplane.agents")

OFFERED_TRANSPORTS = (MuxTransport.name, DedicatedTransport.name)
"""VNC transports this control plane serves; an agent's hello says which it uses."""

HELLO_TIMEOUT_S = 10.0
"""Seconds an accepted socket may take to send ``agent.hello``."""

CLOSE_HELLO_TIMEOUT = 4408
"""Close code when no ``agent.hello`` arrives in time (as for missed heartbeats)."""
_MAX_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes


def routes(*, hello_timeout_s: float = HELLO_TIMEOUT_S) -> list[BaseRoute]:
    """Return the agent WebSocket routes, the ``ws-dedicated`` stream socket included."""

    async def endpoint(websocket: WebSocket) -> None:
        await agent_socket(websocket, hello_timeout_s=hello_timeout_s)

    return [
        *(WebSocketRoute(p, endpoint, name=f"agent-ws-{i}") for i, p in enumerate(AGENT_PATHS)),
        *streams.routes(),
    ]


def new_connection_id() -> str:
    """Return a fresh connection id, ``ws-`` and 16 hex digits."""
    return f"ws-{secrets.token_hex(8)}"


def _close_reason(reason: str) -> str:
    data = reason.encode()
    if len(data) <= _MAX_REASON_BYTES:
        return reason
    return data[: _MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


class AgentSocket:
    """One registered agent's WebSocket, as the hub and the services see it.

    Its :attr:`mux` carries the VNC streams of the ``ws-mux`` transport: viewers open
    streams on it, and the socket's reader hands it every binary and ``vnc.*`` frame.
    """

    def __init__(
        self,
        websocket: WebSocket,
        agent_id: str,
        conn_id: str,
        transports: list[str] | None = None,
        *,
        token_id: str = "",
    ) -> None:
        self._ws = websocket
        self._agent_id = agent_id
        self._conn_id = conn_id
        self._token_id = token_id
        self._lock = asyncio.Lock()
        self.mux = MuxStreams(self)
        """The VNC streams multiplexed on this socket."""
        self.transports = transports or [MuxTransport.name]
        """The VNC transports the agent said it uses, preferred first (``ws-mux`` for an
        agent that names none)."""

    @property
    def vnc_transport(self) -> str | None:
        """The transport for this agent's viewers: its first that is offered, else ``None``."""
        return next((t for t in self.transports if t in OFFERED_TRANSPORTS), None)

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def conn_id(self) -> str:
        return self._conn_id

    @property
    def token_id(self) -> str:
        return self._token_id

    async def send(self, frame: WireModel) -> None:
        await self._send(text=dump_frame(frame))

    async def send_binary(self, data: bytes) -> None:
        await self._send(data=data)

    async def _send(self, *, text: str | None = None, data: bytes | None = None) -> None:
        try:
            async with self._lock:
                if text is not None:
                    await self._ws.send_text(text)
                else:
                    await self._ws.send_bytes(cast(bytes, data))
        except (WebSocketDisconnect, WebSocketDisconnected, OSError) as exc:
            raise ConnectionError(f"agent {self._agent_id} connection is closed") from exc

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError):
            await self._ws.close(code, _close_reason(reason))


async def agent_socket(websocket: WebSocket, *, hello_timeout_s: float = HELLO_TIMEOUT_S) -> None:
    """Serve one agent connection from handshake to close."""
    cp = cast(ControlPlane, websocket.app.state.cp)
    try:
        token = await auth.authenticate_agent(
            cp, auth.parse_bearer(websocket.headers.get("authorization"))
        )
    except ApiError as exc:
        logger.warning("Refused an agent connection: %s", exc.message)
        await deny_websocket(
            websocket, exc, registry.CLOSE_UNAUTHORIZED, _close_reason(exc.message)
        )
        return
    await websocket.accept()
    gauge = cp.metrics.websockets.labels("agent")
    gauge.inc()
    conn: AgentSocket | None = None
    try:
        hello = await _receive_hello(websocket, hello_timeout_s)
        if hello is None:
            return
        conn = AgentSocket(
            websocket,
            hello.agent_id,
            new_connection_id(),
            hello.transports,
            token_id=token.token_id,
        )
        try:
            await registry.register(cp, conn, hello, token_agent_id=token.agent_id)
        except registry.Refused:
            conn = None  # it never became the agent's connection: nothing to clean up
            raise
        try:
            await _serve(cp, websocket, conn)
        finally:
            conn.mux.close_all("the agent's connection closed")
            streams.dedicated_streams(cp).connection_closed(conn.conn_id, "it closed")
    except registry.Refused as exc:
        logger.info("Closing agent connection: %s", exc)
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError):
            await websocket.close(exc.code, _close_reason(exc.reason))
    except ConnectionError:
        pass  # the socket went away while we were sending
    finally:
        if conn is not None:
            # Safe even if another connection took over: only the current one is undone.
            try:
                await registry.unregister(cp, conn)
            except StreamSpaceError as exc:  # the store away: the reconciler catches up
                logger.warning("Cleaning up agent connection %s failed: %s", conn.conn_id, exc)
            except Exception:
                logger.exception("Cleaning up agent connection %s failed", conn.conn_id)
        gauge.dec()


async def _receive_hello(websocket: WebSocket, timeout_s: float) -> AgentHello | None:
    """Return the agent's hello, or ``None`` if it hung up first.

    Raises:
        Refused: No hello in time, or the first frame is not a valid ``agent.hello``.
    """
    try:
        async with asyncio.timeout(timeout_s):
            message = await websocket.receive()
    except TimeoutError:
        raise registry.Refused(
            CLOSE_HELLO_TIMEOUT, f"no agent.hello within {timeout_s:g}s"
        ) from None
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    if text is None:
        raise registry.Refused(registry.CLOSE_BAD_HELLO, "expected agent.hello, got a binary frame")
    try:
        frame = parse_frame(text)
    except ProtocolError as exc:
        raise registry.Refused(
            registry.CLOSE_BAD_HELLO, f"expected agent.hello: {exc.code}: {exc.reason}"
        ) from None
    if not isinstance(frame, AgentHello):
        raise registry.Refused(
            registry.CLOSE_BAD_HELLO, f"expected agent.hello first, got {frame.type}"
        )
    return frame


async def _serve(cp: ControlPlane, websocket: WebSocket, conn: AgentSocket) -> None:
    """Read frames until the socket closes; answer refused ones with an error frame.

    Raises:
        Refused: Another connection of the agent took over, or a frame whose loss would
            lose state could not be recorded.
    """
    refused = cp.metrics.frames_refused
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        reply: Error | None
        text = message.get("text")
        if text is None:
            try:
                await conn.mux.receive_binary(message.get("bytes") or b"")
                reply = None
            except ProtocolError as exc:
                reply = error_frame(exc)
        else:
            try:
                frame = parse_frame(text)
            except ProtocolError as exc:
                reply = error_frame(exc)
            else:
                if isinstance(frame, VncOpened | VncClose | VncCredit):
                    if isinstance(frame, VncClose):
                        streams.dedicated_streams(cp).refused(conn.conn_id, frame)
                    await conn.mux.receive(frame)
                    continue
                try:
                    reply = await registry.handle(cp, conn, frame)
                except registry.Refused:
                    raise
                except Exception:
                    logger.exception("Handling %s from agent %s failed", frame.type, conn.agent_id)
                    reply = Error(
                        code="internal",
                        message=f"the control plane failed to handle {frame.type}; "
                        "send it again later",
                        ref=frame.type,
                    )
        if reply is not None:
            refused.labels(reply.code).inc()
            try:
                await conn.send(reply)
            except ConnectionError:
                return
