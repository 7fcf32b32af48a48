"""The ``ws-mux`` transport: VNC streams as binary frames on the agent's own WebSocket.

Both ends of the agent's socket hold one :class:`MuxStreams`: the control plane opens
streams (``vnc.open``), the agent accepts them (``vnc.opened``) or refuses them
(``vnc.close``). Bytes travel as binary frames (:func:`~streamspace_sdk.protocol.encode_data`)
of at most :data:`~streamspace_sdk.protocol.MAX_BINARY_PAYLOAD_BYTES` each.

Flow control is by credit, per stream and per direction: a sender may have at most the
receiver's window in flight; the receiver grants more with ``vnc.credit`` once its reader
has consumed half a window (batched, so a credit frame costs little per byte). A receiver
therefore never buffers more than its window, however slow its reader: a stalled viewer
stops the agent's sender, which stops reading the VNC server.

The reader loop of the socket hands every binary frame to :meth:`MuxStreams.receive_binary`
and every ``vnc.opened``, ``vnc.close`` and ``vnc.credit`` to :meth:`MuxStreams.receive`;
neither ever waits for a stream's reader, so one slow viewer cannot stall the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from typing import ClassVar, Protocol

from streamspace_sdk.errors import ProtocolError, StreamRefused
from streamspace_sdk.protocol import (
    MAX_BINARY_PAYLOAD_BYTES,
    Frame,
    VncClose,
    VncCredit,
    VncOpen,
    VncOpened,
    decode_data,
    encode_data,
)
from streamspace_sdk.transport import DEFAULT_WINDOW_BYTES, AgentLink, ByteStream, Transport

__all__ = ["MuxLink", "MuxStream", "MuxStreams", "MuxTransport"]

_MAX_REASON_CHARS = 200
"""A ``vnc.close`` reason is for logs; longer ones are cut."""


class MuxLink(Protocol):
    """The socket a :class:`MuxStreams` sends on (the agent's link, or the control plane's
    side of the agent socket). Both methods raise ``ConnectionError`` once it is closed."""

    async def send(self, frame: Frame) -> None:
        """Send one text frame."""
        ...

    async def send_binary(self, data: bytes) -> None:
        """Send one binary frame."""
        ...


class MuxStream(ByteStream):
    """One VNC stream on a multiplexed socket.

    ``read`` returns chunks as they arrived and grants credit as it goes; ``write`` splits
    data into frames and waits while the peer's window is spent. Close is idempotent; after
    it, or after the peer's ``vnc.close``, ``read`` returns what is buffered and then
    ``b""`` and ``write`` raises ``ConnectionError``.
    """

    def __init__(
        self, mux: MuxStreams, stream_id: int, *, recv_window: int, send_window: int
    ) -> None:
        self.stream_id = stream_id
        """Id of the stream on its socket."""
        self.recv_window = recv_window
        """Bytes the peer may have in flight to this end (the window this end grants)."""
        self.close_reason = ""
        """Why the stream closed, once it has (empty for a normal close)."""
        self._mux = mux
        self._send_credit = send_window
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._uncredited = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        if send_window > 0:
            self._writable.set()
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._opened: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        """Whether the stream is closed (by either side, or by the loss of the socket)."""
        return self._closed

    async def read(self) -> bytes:
        """Return the next chunk; ``b""`` once the stream is closed and drained."""
        while not self._buffer:
            if self._closed:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._buffer.popleft()
        self._buffered -= len(chunk)
        self._uncredited += len(chunk)
        if self._uncredited >= max(1, self.recv_window // 2) and not self._closed:
            credit, self._uncredited = self._uncredited, 0
            with contextlib.suppress(ConnectionError):
                await self._mux.link.send(VncCredit(stream_id=self.stream_id, credit_bytes=credit))
        return chunk

    async def write(self, data: bytes) -> None:
        """Send ``data`` in frames of at most the peer's remaining window.

        Raises:
            ConnectionError: the stream is closed (or closes while waiting for credit).
        """
        view = memoryview(data)
        async with self._write_lock:
            while view:
                while self._send_credit <= 0 and not self._closed:
                    self._writable.clear()
                    await self._writable.wait()
                if self._closed:
                    raise ConnectionError(f"VNC stream {self.stream_id} is closed")
                size = min(len(view), self._send_credit, MAX_BINARY_PAYLOAD_BYTES)
                self._send_credit -= size
                await self._mux.link.send_binary(encode_data(self.stream_id, view[:size]))
                view = view[size:]

    async def close(self) -> None:
        """Close both directions and tell the peer with ``vnc.close``. Idempotent."""
        if self._closed:
            return
        self._shut("")
        self._buffer.clear()
        self._buffered = 0
        with contextlib.suppress(ConnectionError):
            await self._mux.link.send(VncClose(stream_id=self.stream_id))

    # -- called by MuxStreams ------------------------------------------------------------

    def _shut(self, reason: str) -> None:
        """Mark the stream closed without telling the peer; wake every waiter."""
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        self._readable.set()
        self._writable.set()
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(StreamRefused(reason or "the stream was closed"))
        self._mux._forget(self)

    def _deliver(self, payload: bytes) -> bool:
        """Buffer bytes from the peer; ``False`` if they overrun the window granted."""
        if self._buffered + self._uncredited + len(payload) > self.recv_window:
            return False
        if payload:
            self._buffer.append(payload)
            self._buffered += len(payload)
            self._readable.set()
        return True

    def _credit(self, credit_bytes: int) -> None:
        self._send_credit += credit_bytes
        self._writable.set()

    def _open_answered(self, window_bytes: int) -> bool:
        """The agent accepted: start sending. ``False`` if no open was pending."""
        if self._opened is None or self._opened.done():
            return False
        self._credit(window_bytes)
        self._opened.set_result(None)
        return True


class MuxStreams:
    """Every VNC stream multiplexed on one agent socket, on one side of it.

    Args:
        link: what frames are sent on.
        window_bytes: the receive window this side grants each stream.
        max_streams: most streams open at once; more are refused.
    """

    def __init__(
        self,
        link: MuxLink,
        *,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        max_streams: int = 4096,
    ) -> None:
        self.link = link
        self.window_bytes = window_bytes
        self.max_streams = max_streams
        self._streams: dict[int, MuxStream] = {}
        self._next_id = 1
        self._closed_reason: str | None = None

    def __len__(self) -> int:
        return len(self._streams)

    def get(self, stream_id: int) -> MuxStream | None:
        """Return the open stream with this id, if any."""
        return self._streams.get(stream_id)

    # -- the control plane's side ---------------------------------------------------------

    async def open(self, session_id: str, *, timeout_s: float) -> MuxStream:
        """Ask the agent for a stream to ``session_id``'s VNC server; return it once open.

        Raises:
            StreamRefused: the agent refused (its ``vnc.close`` reason), did not answer in
                ``timeout_s``, or its socket is closed.
        """
        if self._closed_reason is not None:
            raise StreamRefused(f"the agent's connection is closed: {self._closed_reason}")
        if len(self._streams) >= self.max_streams:
            raise StreamRefused(f"the agent's connection carries {self.max_streams} streams")
        stream_id = self._allocate()
        stream = MuxStream(self, stream_id, recv_window=self.window_bytes, send_window=0)
        opened = stream._opened = asyncio.get_running_loop().create_future()
        self._streams[stream_id] = stream
        try:
            await self.link.send(
                VncOpen(
                    stream_id=stream_id,
                    session_id=session_id,
                    transport=MuxTransport.name,
                    window_bytes=self.window_bytes,
                )
            )
            async with asyncio.timeout(timeout_s):
                await opened
        except TimeoutError:
            await stream.close()
            raise StreamRefused(
                f"the agent did not open the stream within {timeout_s:g}s"
            ) from None
        except ConnectionError as exc:
            stream._shut(str(exc))
            if isinstance(exc, StreamRefused):
                raise
            raise StreamRefused(f"the agent's connection is closed: {exc}") from None
        except BaseException:
            stream._shut("cancelled")
            raise
        return stream

    def _allocate(self) -> int:
        while True:
            stream_id = self._next_id
            self._next_id = self._next_id % 0xFFFFFFFF + 1
            if stream_id not in self._streams:
                return stream_id

    # -- the agent's side -----------------------------------------------------------------

    def accept(self, request: VncOpen) -> MuxStream:
        """Register the stream a ``vnc.open`` asks for; :meth:`confirm` it once connected.

        Raises:
            ProtocolError: ``duplicate_stream`` when the id is in use, ``too_many_streams``.
        """
        if request.stream_id in self._streams:
            raise ProtocolError("duplicate_stream", f"stream {request.stream_id} is already open")
        if len(self._streams) >= self.max_streams:
            raise ProtocolError("too_many_streams", f"{self.max_streams} streams are open")
        stream = MuxStream(
            self,
            request.stream_id,
            recv_window=self.window_bytes,
            send_window=request.window_bytes,
        )
        self._streams[request.stream_id] = stream
        return stream

    async def confirm(self, stream: MuxStream) -> None:
        """Tell the control plane the stream is connected (``vnc.opened``)."""
        await self.link.send(VncOpened(stream_id=stream.stream_id, window_bytes=stream.recv_window))

    async def refuse(self, stream_id: int, reason: str) -> None:
        """Close (or decline) a stream with a reason the control plane logs."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._shut(reason)
        with contextlib.suppress(ConnectionError):
            await self.link.send(VncClose(stream_id=stream_id, reason=reason[:_MAX_REASON_CHARS]))

    # -- both sides: what the socket's reader hands over ---------------------------------

    async def receive_binary(self, data: bytes) -> None:
        """Route one binary frame to its stream; bytes of a stream closed meanwhile are dropped.

        Raises:
            ProtocolError: the frame is malformed (answer it with an ``error`` frame).
        """
        stream_id, payload = decode_data(data)
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not stream._deliver(bytes(payload)):
            await self.refuse(stream_id, "flow control violated: more bytes than the window")

    async def receive(self, frame: VncOpened | VncClose | VncCredit) -> None:
        """Act on a stream's control frame; frames of unknown streams are stale and ignored,
        except a ``vnc.opened`` nobody waits for, which is answered with ``vnc.close``."""
        stream = self._streams.get(frame.stream_id)
        if isinstance(frame, VncOpened):
            if stream is None or not stream._open_answered(frame.window_bytes):
                with contextlib.suppress(ConnectionError):
                    await self.link.send(VncClose(stream_id=frame.stream_id, reason="not opening"))
        elif stream is None:
            return
        elif isinstance(frame, VncClose):
            stream._shut(frame.reason)
        else:
            stream._credit(frame.credit_bytes)

    def close_all(self, reason: str) -> None:
        """The socket is gone: end every stream (reads drain then end, writes raise)."""
        self._closed_reason = reason
        for stream in list(self._streams.values()):
            stream._shut(reason)

    def _forget(self, stream: MuxStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]


class MuxTransport(Transport):
    """``ws-mux``: each viewer a stream of binary frames on the agent's own socket.

    Nothing is dialled per viewer, so it works wherever the agent's socket does. The
    agent's runtime hands the socket's VNC frames to :meth:`streams` of its link.
    """

    name: ClassVar[str] = "ws-mux"
    capabilities: ClassVar[frozenset[str]] = frozenset({"multiplexed"})

    class Settings(Transport.Settings):
        """``ws-mux`` has no settings of its own."""

    def __init__(self, settings: Transport.Settings | None = None) -> None:
        super().__init__(settings)
        self._muxes: weakref.WeakKeyDictionary[AgentLink, MuxStreams] = weakref.WeakKeyDictionary()

    def streams(self, link: AgentLink) -> MuxStreams:
        """Return the streams multiplexed on ``link`` (made on first use)."""
        mux = self._muxes.get(link)
        if mux is None:
            mux = self._muxes[link] = MuxStreams(link)
        return mux

    async def _open_stream(self, link: AgentLink, request: VncOpen) -> ByteStream:
        """Register the agent's end of the stream and tell the control plane it is open."""
        if request.transport != self.name:
            raise ProtocolError(
                "bad_transport", f"stream asks for {request.transport!r}, not {self.name!r}"
            )
        mux = self.streams(link)
        stream = mux.accept(request)
        try:
            await mux.confirm(stream)
        except ConnectionError as exc:
            stream._shut(str(exc))
            raise StreamRefused(f"the control plane's socket is closed: {exc}") from None
        return stream
