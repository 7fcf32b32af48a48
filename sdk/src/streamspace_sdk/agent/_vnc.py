"""The agent's VNC relay: a ``vnc.open`` becomes a TCP connection to the session's VNC server.

For each stream the control plane opens, the agent asks the platform where the session's
VNC server answers, connects to it, then opens its end of the stream through the transport
(``ws-mux`` says ``vnc.opened``; ``ws-dedicated`` dials the stream's socket) and pumps bytes
both ways, unread and unchanged, until either side closes; then the other side is closed
too. A stream that cannot be served (unknown session, connection refused, another transport
asked for) is answered with ``vnc.close`` and a reason.

Each stream served is logged at INFO when it opens (``VNC tunnel initialized for session
<id>``, the seed guide's wording) and when it closes, with how long it lasted and the bytes
relayed each way; refusals are warnings. One line each way per viewer connection, never
per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from streamspace_sdk.agent._tcp import STALL_TIMEOUT_S, VncConnection, open_vnc_connection
from streamspace_sdk.errors import ProtocolError, StreamSpaceError
from streamspace_sdk.platform import Platform
from streamspace_sdk.protocol import Frame, VncClose, VncCredit, VncOpen, VncOpened, dump_frame
from streamspace_sdk.transport import ByteStream, Transport
from streamspace_sdk.transports.mux import MuxStreams, MuxTransport

__all__ = ["SocketLink", "VncRelay"]

logger = logging.getLogger("streamspace.agent.vnc")


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
    """Every VNC stream of one agent, across its connections, through one transport.

    Args:
        platform: locates each session's VNC server.
        transport: the ``VNC_TRANSPORT`` driver.
        connect_timeout_s: seconds to connect to a VNC server before refusing the stream.
        stall_timeout_s: seconds a VNC server may take none of the bytes sent to it before
            its stream is closed.
    """

    def __init__(
        self,
        platform: Platform,
        transport: Transport,
        *,
        connect_timeout_s: float = 10.0,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ) -> None:
        self._platform = platform
        self._transport = transport
        self._connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        """Applies to streams opened after a change."""
        self._link: SocketLink | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._opening: dict[int, asyncio.Task[None]] = {}
        self.requested = 0
        """``vnc.open`` frames received, served or not."""
        self.opened = 0
        """Streams connected to a VNC server."""
        self.active = 0
        """Streams connected now (until both of their ends are closed)."""

    def attach(self, link: SocketLink) -> None:
        """Serve streams on a newly registered connection."""
        self._link = link

    async def detach(self, reason: str) -> None:
        """The connection is gone: end its streams and wait for their relays to stop."""
        mux = self._mux()
        if mux is not None:
            mux.close_all(reason)
        self._link = None
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
        self._opening[request.stream_id] = task
        task.add_done_callback(self._tasks.discard)

    async def receive(self, frame: VncOpened | VncClose | VncCredit) -> None:
        """Act on a stream's control frame: a ``vnc.close`` of a stream still being opened
        (the viewer left) stops the opening; the rest go to the multiplexer, if any."""
        if isinstance(frame, VncClose) and (task := self._opening.get(frame.stream_id)):
            task.cancel()
        mux = self._mux()
        if mux is not None:
            await mux.receive(frame)

    async def receive_binary(self, data: bytes) -> None:
        """Hand a binary frame to the multiplexer.

        Raises:
            ProtocolError: the frame is malformed, or this agent's transport does not carry
                bytes on the agent socket.
        """
        mux = self._mux()
        if mux is None:
            raise ProtocolError(
                "bad_transport",
                f"binary frames carry ws-mux streams; this agent uses {self._transport.name}",
            )
        await mux.receive_binary(data)

    def _mux(self) -> MuxStreams | None:
        if self._link is None or not isinstance(self._transport, MuxTransport):
            return None
        return self._transport.streams(self._link)

    async def _serve(self, request: VncOpen) -> None:
        link = self._link
        try:
            if link is None:
                return  # the connection closed before the task ran
            if request.transport != self._transport.name:
                await self._refuse(
                    link,
                    request.stream_id,
                    f"the control plane asked for transport {request.transport!r}; "
                    f"this agent uses {self._transport.name!r} (VNC_TRANSPORT)",
                )
                return
            try:
                endpoint = await self._platform.vnc_endpoint(request.session_id)
                async with asyncio.timeout(self._connect_timeout_s):
                    server = await open_vnc_connection(
                        endpoint.host, endpoint.port, stall_timeout_s=self.stall_timeout_s
                    )
            except StreamSpaceError as exc:
                await self._refuse(link, request.stream_id, f"session {request.session_id}: {exc}")
                return
            except (OSError, TimeoutError) as exc:
                reason = f"cannot connect to the VNC server of session {request.session_id}: "
                await self._refuse(
                    link, request.stream_id, reason + (str(exc) or type(exc).__name__)
                )
                return
        finally:
            self._opening.pop(request.stream_id, None)
        try:
            try:
                stream = await self._transport.open_stream(link, request)
            except StreamSpaceError as exc:
                await self._refuse(link, request.stream_id, str(exc))
                return
            self.opened += 1
            self.active += 1
            # The seed guide has operators grep the agent's log for "VNC tunnel".
            logger.info(
                "VNC tunnel initialized for session %s (stream %d, %s, VNC server %s:%d)",
                request.session_id,
                request.stream_id,
                self._transport.name,
                endpoint.host,
                endpoint.port,
            )
            started = asyncio.get_running_loop().time()
            traffic = _Traffic()
            try:
                try:
                    await _pump_both(stream, server, traffic)
                except ConnectionError:
                    pass
                finally:
                    await stream.close()
                    await server.close()
            finally:
                self.active -= 1  # counted until both ends are closed
                logger.info(
                    "VNC tunnel closed for session %s (stream %d, after %.1fs, "
                    "%d bytes to the viewer, %d to the VNC server)",
                    request.session_id,
                    request.stream_id,
                    asyncio.get_running_loop().time() - started,
                    traffic.to_viewer,
                    traffic.to_server,
                )
        finally:
            await server.close()

    async def _refuse(self, link: SocketLink, stream_id: int, reason: str) -> None:
        logger.warning("Refused VNC stream %d: %s", stream_id, reason)
        mux = self._mux()
        if mux is not None:
            await mux.refuse(stream_id, reason)
            return
        with contextlib.suppress(ConnectionError):
            await link.send(VncClose(stream_id=stream_id, reason=reason[:200]))


class _Traffic:
    """Bytes one stream relayed each way, for its closing log line."""

    def __init__(self) -> None:
        self.to_viewer = 0
        self.to_server = 0


async def _pump_both(stream: ByteStream, server: VncConnection, traffic: _Traffic) -> None:
    """Relay until either side ends, counting the bytes; the caller closes both."""

    async def to_viewer() -> None:
        while data := await server.read():
            await stream.write(data)
            traffic.to_viewer += len(data)

    async def to_server() -> None:
        while data := await stream.read():
            await server.write(data)
            traffic.to_server += len(data)

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
