"""The control plane's side of ``ws-dedicated``: ``/api/v1/agents/vnc/{stream_token}``.

For a viewer of an agent that uses ``ws-dedicated``, the viewer socket asks
:meth:`DedicatedStreams.open` for a stream: it makes a one-time token, sends ``vnc.open``
with it on the agent's own socket and waits. The agent connects to the session's VNC server
and dials this route with the token; the socket is accepted only for a token that is
waiting, unused and unexpired (else HTTP 403 before the handshake), and handed to the
waiting viewer as a :class:`WebSocketStream`. The agent refuses a stream it cannot serve
with ``vnc.close`` on its own socket, which ends the wait with its reason.

The token is the only credential: 256 random bits, sent only on the agent's authenticated
socket, valid for one dial within the open timeout, kept as a hash, never logged. The route
holds the socket open until the viewer's relay closes the stream.

With several replicas the agent's dial may land on a replica other than the one waiting.
The waiting one leaves a hub ticket naming its URL; the replica the dial landed on takes
it, opens the same route on the waiting replica (marked :data:`FORWARDED_HEADER`, so it
is never forwarded twice) and pumps the bytes between the two sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast
from urllib.parse import quote

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.auth import hash_token
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.http import deny_websocket
from streamspace_controlplane.hub.base import Hub, HubUnavailable
from streamspace_controlplane.routes._relay import (
    ReplicaRefused,
    dial_replica,
    relay_to_replica,
)
from streamspace_sdk.errors import StreamRefused
from streamspace_sdk.protocol import (
    DEDICATED_STREAM_PATH,
    MAX_BINARY_PAYLOAD_BYTES,
    VncClose,
    VncOpen,
)
from streamspace_sdk.transport import ByteStream
from streamspace_sdk.transports.dedicated import DedicatedTransport

if TYPE_CHECKING:
    from streamspace_controlplane.routes.agents import AgentSocket

__all__ = ["FORWARDED_HEADER", "DedicatedStreams", "WebSocketStream", "dedicated_streams", "routes"]

logger = logging.getLogger("streamspace.controlplane.vnc")

_EXTRA = "vnc.dedicated"
FORWARDED_HEADER = "x-streamspace-forwarded-by"
"""Marks a dial forwarded by another replica (its id); such a dial is never forwarded on."""
_CLOSE_UNSUPPORTED = 1003
_CLOSE_POLICY = 1008


class WebSocketStream(ByteStream):
    """An accepted Starlette WebSocket as a :class:`ByteStream` (binary messages only)."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self.finished = asyncio.Event()
        """Set once the stream is closed, by :meth:`close` or by the peer."""

    async def read(self) -> bytes:
        """Return the next message's bytes; ``b""`` once the peer has closed."""
        while not self.finished.is_set():
            try:
                message = await self._ws.receive()
            except (WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError):
                break
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data is None:
                await self._close(_CLOSE_UNSUPPORTED, "VNC data must be sent in binary frames")
                break
            if data:
                return cast(bytes, data)
        self.finished.set()
        return b""

    async def write(self, data: bytes) -> None:
        """Send ``data`` in messages of at most ``MAX_BINARY_PAYLOAD_BYTES`` (what the
        agent's end accepts); waits while the socket's buffer is full.

        Raises:
            ConnectionError: the socket is closed.
        """
        if self.finished.is_set():
            raise ConnectionError("the stream's socket is closed")
        try:
            if len(data) <= MAX_BINARY_PAYLOAD_BYTES:
                await self._ws.send_bytes(data)
                return
            view = memoryview(data)
            while view:
                await self._ws.send_bytes(bytes(view[:MAX_BINARY_PAYLOAD_BYTES]))
                view = view[MAX_BINARY_PAYLOAD_BYTES:]
        except (WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError) as exc:
            self.finished.set()
            raise ConnectionError("the stream's socket is closed") from exc

    async def close(self) -> None:
        """Close the socket. Idempotent."""
        await self._close(1000, "")

    async def _close(self, code: int, reason: str) -> None:
        if self.finished.is_set():
            return
        self.finished.set()
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError):
            await self._ws.close(code, reason)


@dataclass
class _Pending:
    conn_id: str
    stream_id: int
    arrived: asyncio.Future[WebSocketStream] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DedicatedStreams:
    """The ``ws-dedicated`` streams this process waits for, by token hash.

    Args:
        hub: where to leave the tickets that let another replica forward a dial here
            (only a hub with the ``multi-replica`` capability gets them).
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._pending: dict[str, _Pending] = {}
        self._next_id = 0

    async def open(self, conn: AgentSocket, session_id: str, *, timeout_s: float) -> ByteStream:
        """Ask ``conn``'s agent for a stream to ``session_id``; return it once dialled.

        Raises:
            StreamRefused: the agent refused (its reason), did not dial in ``timeout_s``,
                or its socket is closed.
        """
        token = secrets.token_urlsafe(32)
        key = hash_token(token)
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        pending = _Pending(conn.conn_id, self._next_id)
        self._pending[key] = pending
        stream: WebSocketStream | None = None
        try:
            if "multi-replica" in self._hub.capabilities and self._hub.url:
                await self._hub.put_ticket(_ticket_key(token), self._hub.url, timeout_s)
            await conn.send(
                VncOpen(
                    stream_id=pending.stream_id,
                    session_id=session_id,
                    transport=DedicatedTransport.name,
                    stream_token=token,
                )
            )
            async with asyncio.timeout(timeout_s):
                stream = await pending.arrived
            return stream
        except TimeoutError:
            with contextlib.suppress(ConnectionError):
                await conn.send(VncClose(stream_id=pending.stream_id, reason="not dialled in time"))
            raise StreamRefused(
                f"the agent did not dial the stream within {timeout_s:g}s"
            ) from None
        except StreamRefused:
            raise
        except ConnectionError as exc:
            raise StreamRefused(f"the agent's connection is closed: {exc}") from None
        except HubUnavailable as exc:
            raise StreamRefused(str(exc)) from None
        finally:
            self._forget(key, pending)
            if stream is None:
                # Not handed over (refused, timed out, cancelled): a socket that arrived
                # anyway is closed, and one still to come finds the wait cancelled.
                arrived = pending.arrived
                if arrived.done() and not arrived.cancelled() and arrived.exception() is None:
                    await arrived.result().close()
                arrived.cancel()

    def claim(self, token: str) -> _Pending | None:
        """Use up ``token``; return the stream waiting for it, if any."""
        key = hash_token(token)
        pending = self._pending.get(key)
        if pending is None or pending.arrived.done():
            return None
        self._forget(key, pending)
        return pending

    def refused(self, conn_id: str, frame: VncClose) -> None:
        """The agent said ``vnc.close`` for a stream: end a wait for it with the reason."""
        self._fail(
            lambda p: p.conn_id == conn_id and p.stream_id == frame.stream_id,
            StreamRefused(frame.reason or "the agent closed it"),
        )

    def connection_closed(self, conn_id: str, reason: str) -> None:
        """The agent's socket is gone: end every wait for a stream of it."""
        self._fail(
            lambda p: p.conn_id == conn_id,
            StreamRefused(f"the agent's connection is closed: {reason}"),
        )

    def _fail(self, match: Callable[[_Pending], bool], exc: StreamRefused) -> None:
        # Only streams between vnc.open and the agent's dial wait here: a scan is cheap.
        for pending in self._pending.values():
            if match(pending) and not pending.arrived.done():
                pending.arrived.set_exception(exc)

    def _forget(self, key: str, pending: _Pending) -> None:
        if self._pending.get(key) is pending:
            del self._pending[key]


def _ticket_key(token: str) -> str:
    return f"stream:{hash_token(token)}"


def dedicated_streams(cp: ControlPlane) -> DedicatedStreams:
    """Return the process's waiting dedicated streams (made on first use)."""
    found = cp.extras.get(_EXTRA)
    if not isinstance(found, DedicatedStreams):
        found = cp.extras[_EXTRA] = DedicatedStreams(cp.hub)
    return found


def routes() -> list[BaseRoute]:
    """Return the route agents dial for a dedicated stream."""
    return [WebSocketRoute(DEDICATED_STREAM_PATH, stream_socket, name="agent-vnc-stream")]


async def stream_socket(websocket: WebSocket) -> None:
    """Accept an agent's dedicated stream socket for a waiting viewer; hold it until closed."""
    cp = cast(ControlPlane, websocket.app.state.cp)
    token = websocket.path_params["stream_token"]
    pending = dedicated_streams(cp).claim(token)
    if pending is None and await _forward(cp, websocket, token):
        return
    if pending is None:
        logger.info("Refused a dedicated VNC stream socket: unknown or used stream token")
        exc = ApiError(403, "forbidden", "unknown, used or expired stream token")
        await deny_websocket(websocket, exc, _CLOSE_POLICY)
        return
    await websocket.accept()
    stream = WebSocketStream(websocket)
    if pending.arrived.done():  # the viewer gave up meanwhile
        await stream.close()
        return
    gauge = cp.metrics.websockets.labels("agent-stream")
    gauge.inc()
    try:
        pending.arrived.set_result(stream)
        await stream.finished.wait()
    finally:
        gauge.dec()


async def _forward(cp: ControlPlane, websocket: WebSocket, token: str) -> bool:
    """Forward a dial meant for another replica there; False if it is for none."""
    hub = cp.hub
    if "multi-replica" not in hub.capabilities or FORWARDED_HEADER in websocket.headers:
        return False
    try:
        url = await hub.take_ticket(_ticket_key(token))
    except HubUnavailable as exc:
        logger.warning("Cannot forward a dedicated VNC stream socket: %s", exc)
        return False
    if not url or url == hub.url:
        return False
    path = DEDICATED_STREAM_PATH.format(stream_token=quote(token, safe=""))
    try:
        stream = await dial_replica(url, path, {FORWARDED_HEADER: hub.pod}, timeout_s=10.0)
    except ReplicaRefused as exc:
        logger.warning("Forwarding a dedicated VNC stream socket to %s failed: %s", url, exc)
        return False
    await relay_to_replica(
        websocket,
        stream,
        idle_timeout_s=cp.settings.vnc_proxy_timeout,
        gauge=cp.metrics.websockets.labels("agent-stream-relay"),
    )
    return True
