"""The agent's VNC relay: a ``vnc.open`` becomes a TCP connection to the session's VNC server.

For each stream the control plane opens, the agent asks the platform where the session's
VNC server answers, connects to it, says ``vnc.opened`` and pumps bytes both ways, unread
and unchanged, until either side closes; then the other side is closed too and the control
plane gets ``vnc.close``. A stream that cannot be served (unknown session, connection
refused, another transport asked for) is answered with ``vnc.close`` and a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from streamspace_sdk import drivers
from streamspace_sdk.errors import StreamSpaceError
from streamspace_sdk.platform import Platform
from streamspace_sdk.protocol import Frame, VncClose, VncCredit, VncOpen, VncOpened, dump_frame
from streamspace_sdk.transport import Transport
from streamspace_sdk.transports.mux import MuxStream, MuxStreams, MuxTransport

__all__ = ["SocketLink", "VncRelay"]

logger = logging.getLogger("streamspace.agent.vnc")

_READ_BYTES = 64 * 1024
"""Bytes read from the VNC server at a time; a quarter of the default window."""


class SocketLink:
    """The agent's registered socket as a transport sees it (an ``AgentLink``)."""

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self._ws = ws
        self._url = url

    @property
    def url(self) -> str:
        """The control plane's agent URL."""
        return self._url

    async def send(self, frame: Frame) -> None:
        """Send one text frame; ``ConnectionError`` once the socket is closed."""
        try:
            await self._ws.send(dump_frame(frame))
        except ConnectionClosed as exc:
            raise ConnectionError("the control plane's socket is closed") from exc

    async def send_binary(self, data: bytes) -> None:
        """Send one binary frame; ``ConnectionError`` once the socket is closed."""
        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise ConnectionError("the control plane's socket is closed") from exc


class VncRelay:
    """Every VNC stream of one agent, across its connections.

    Args:
        platform: locates each session's VNC server.
        transport_name: the ``VNC_TRANSPORT`` driver, loaded on the first stream.
        connect_timeout_s: seconds to connect to a VNC server before refusing the stream.
    """

    def __init__(
        self, platform: Platform, transport_name: str, *, connect_timeout_s: float = 10.0
    ) -> None:
        self._platform = platform
        self._transport_name = transport_name
        self._transport: Transport | None = None
        self._connect_timeout_s = connect_timeout_s
        self._link: SocketLink | None = None
        self._mux: MuxStreams | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.requested = 0
        """``vnc.open`` frames received, served or not."""
        self.opened = 0
        """Streams connected to a VNC server."""
        self.active = 0
        """Streams connected now."""

    def attach(self, link: SocketLink) -> None:
        """Serve streams on a newly registered connection."""
        self._link = link
        self._mux = None

    async def detach(self, reason: str) -> None:
        """The connection is gone: end its streams and wait for their relays to stop."""
        if self._mux is not None:
            self._mux.close_all(reason)
        self._link = None
        self._mux = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def open(self, request: VncOpen) -> None:
        """Serve a ``vnc.open`` in the background (connecting must not stall the reader)."""
        self.requested += 1
        task = asyncio.create_task(self._serve(request), name=f"vnc stream {request.stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def receive(self, frame: VncOpened | VncClose | VncCredit) -> None:
        """Hand a stream's control frame to the multiplexer."""
        if self._mux is not None:
            await self._mux.receive(frame)

    async def receive_binary(self, data: bytes) -> None:
        """Hand a binary frame to the multiplexer (``ProtocolError`` if malformed)."""
        if self._mux is not None:
            await self._mux.receive_binary(data)

    def _streams(self) -> MuxStreams | str:
        """Return the multiplexer of this connection, or why streams cannot be served."""
        if self._mux is not None:
            return self._mux
        link = self._link
        if link is None:
            return "the agent is not connected"
        if self._transport is None:
            try:
                self._transport = drivers.load_driver(
                    drivers.TRANSPORTS, self._transport_name, base=Transport
                )
            except StreamSpaceError as exc:
                return f"VNC_TRANSPORT {self._transport_name!r} cannot be loaded: {exc}"
        if not isinstance(self._transport, MuxTransport):
            return f"transport {self._transport_name!r} carries no streams on the agent socket"
        self._mux = self._transport.streams(link)
        return self._mux

    async def _serve(self, request: VncOpen) -> None:
        mux = self._streams()
        if isinstance(mux, str):
            await self._refuse(request.stream_id, mux)
            return
        try:
            stream = await self._transport_open(request)
        except StreamSpaceError as exc:
            await mux.refuse(request.stream_id, str(exc))
            return
        try:
            endpoint = await self._platform.vnc_endpoint(request.session_id)
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        except StreamSpaceError as exc:
            await mux.refuse(request.stream_id, f"session {request.session_id}: {exc}")
            return
        except (OSError, TimeoutError) as exc:
            reason = f"cannot connect to the VNC server of session {request.session_id}: "
            await mux.refuse(request.stream_id, reason + (str(exc) or type(exc).__name__))
            return
        try:
            if stream.closed:
                return  # the viewer left while we connected
            await mux.confirm(stream)
            self.opened += 1
            self.active += 1
            try:
                await _pump_both(stream, reader, writer)
            finally:
                self.active -= 1
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            await stream.close()

    async def _transport_open(self, request: VncOpen) -> MuxStream:
        assert self._link is not None
        assert self._transport is not None
        stream = await self._transport.open_stream(self._link, request)
        assert isinstance(stream, MuxStream)
        return stream

    async def _refuse(self, stream_id: int, reason: str) -> None:
        logger.warning("Refused VNC stream %d: %s", stream_id, reason)
        if self._link is not None:
            with contextlib.suppress(ConnectionError):
                await self._link.send(VncClose(stream_id=stream_id, reason=reason))


async def _pump_both(
    stream: MuxStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Relay until either side ends; the caller closes both."""

    async def to_viewer() -> None:
        while data := await reader.read(_READ_BYTES):
            await stream.write(data)

    async def to_server() -> None:
        while data := await stream.read():
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(to_viewer()), asyncio.create_task(to_server())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, ConnectionError | OSError):
            raise result
