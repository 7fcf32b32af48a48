"""The ``ws-dedicated`` transport: the agent dials a fresh WebSocket for each viewer.

The control plane sends ``vnc.open`` with ``transport="ws-dedicated"`` and a one-time
``stream_token``; the agent connects to the session's VNC server, then dials
:data:`~streamspace_sdk.protocol.DEDICATED_STREAM_PATH` beside its agent endpoint, and the
VNC bytes travel on that socket as plain binary messages, with no header. A stream that
cannot be served is refused with ``vnc.close`` on the agent's own socket, as for ``ws-mux``.

Flow control is the socket's own: TCP and the WebSocket library's bounded queues. A reader
that stops reading fills at most :data:`QUEUE_MESSAGES` messages of at most
:data:`~streamspace_sdk.protocol.MAX_BINARY_PAYLOAD_BYTES` plus the kernel's socket buffers,
and then the writer waits. A slow viewer never shares a socket with another, so nothing it
does can hold up a different stream, and the agent's command socket stays free of VNC bytes.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State

from streamspace_sdk.errors import ProtocolError, StreamRefused
from streamspace_sdk.protocol import (
    AGENT_PATHS,
    DEDICATED_STREAM_PATH,
    MAX_BINARY_PAYLOAD_BYTES,
    VncOpen,
)
from streamspace_sdk.transport import AgentLink, ByteStream, Transport

__all__ = ["QUEUE_MESSAGES", "DedicatedStream", "DedicatedTransport", "stream_url"]

QUEUE_MESSAGES = 4
"""Messages the agent's end queues before it stops reading its socket (the library's
``max_queue``): with the frame size cap, at most 1 MiB held for a viewer that stalls."""

DIAL_TIMEOUT_S = 10.0
"""Seconds the agent may take to dial the stream's socket before the stream is refused."""

CLOSE_TIMEOUT_S = 2.0
"""Seconds a closing stream waits for the control plane's close reply before it drops the
connection: a stalled viewer's socket may never read the close frame."""


def stream_url(agent_url: str, stream_token: str) -> str:
    """Return the URL of a dedicated stream's socket, beside the agent endpoint ``agent_url``.

    The agent endpoint's own path (one of :data:`~streamspace_sdk.protocol.AGENT_PATHS`) is
    replaced, so a control plane behind a path prefix works as it does for the agent socket.
    """
    parts = urlsplit(agent_url)
    path = parts.path.rstrip("/")
    for suffix in AGENT_PATHS:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    path += DEDICATED_STREAM_PATH.format(stream_token=quote(stream_token, safe=""))
    return urlunsplit(parts._replace(path=path, query="", fragment=""))


class DedicatedStream(ByteStream):
    """One viewer's stream on its own WebSocket (the agent's end)."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    @property
    def closed(self) -> bool:
        """Whether the socket has started closing, from either end."""
        return self._ws.state in (State.CLOSING, State.CLOSED)

    async def read(self) -> bytes:
        """Return the next message's bytes; ``b""`` once the socket is closed."""
        while True:
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                return b""
            if isinstance(message, str):
                await self._ws.close(1003, "VNC data must be sent in binary frames")
                return b""
            if message:
                return message

    async def write(self, data: bytes) -> None:
        """Send ``data`` in messages of at most ``MAX_BINARY_PAYLOAD_BYTES``.

        Raises:
            ConnectionError: the socket is closed.
        """
        view = memoryview(data)
        try:
            while view:
                await self._ws.send(view[:MAX_BINARY_PAYLOAD_BYTES])
                view = view[MAX_BINARY_PAYLOAD_BYTES:]
        except ConnectionClosed as exc:
            raise ConnectionError("the stream's socket is closed") from exc

    async def close(self) -> None:
        """Close the socket; the control plane then closes the viewer. Idempotent.

        A peer that stopped reading never takes the close frame, so after
        :data:`CLOSE_TIMEOUT_S` the connection is dropped instead.
        """
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._ws.close()
        except TimeoutError:
            self._ws.transport.abort()
        except (ConnectionClosed, OSError):
            pass


class DedicatedTransport(Transport):
    """``ws-dedicated``: each viewer a WebSocket of its own, dialled by the agent.

    Choose it where the agent's socket should carry commands only, or where one socket's
    bandwidth would be shared by many viewers; it needs the agent to be able to open
    further connections to the control plane's URL, as it does for its own socket.
    """

    name: ClassVar[str] = "ws-dedicated"
    capabilities: ClassVar[frozenset[str]] = frozenset({"dedicated"})

    class Settings(Transport.Settings):
        """``ws-dedicated`` has no settings of its own."""

    async def _open_stream(self, link: AgentLink, request: VncOpen) -> ByteStream:
        """Dial the stream's socket and return its end, ready for bytes."""
        if request.transport != self.name:
            raise ProtocolError(
                "bad_transport", f"stream asks for {request.transport!r}, not {self.name!r}"
            )
        if not request.stream_token:
            raise ProtocolError("invalid", "a ws-dedicated vnc.open needs a stream_token")
        url = stream_url(link.url, request.stream_token)
        try:
            ws = await connect(
                url,
                compression=None,  # VNC data is already compressed
                open_timeout=DIAL_TIMEOUT_S,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=MAX_BINARY_PAYLOAD_BYTES,
                max_queue=QUEUE_MESSAGES,
                ping_interval=None,  # the agent's own socket is pinged; this one ends with it
            )
        except InvalidStatus as exc:
            raise StreamRefused(
                f"the control plane refused stream {request.stream_id}'s socket "
                f"(HTTP {exc.response.status_code})"
            ) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise StreamRefused(
                f"cannot dial stream {request.stream_id}'s socket: {exc or type(exc).__name__}"
            ) from None
        return DedicatedStream(ws)
