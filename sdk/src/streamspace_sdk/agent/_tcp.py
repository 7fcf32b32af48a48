"""The agent's TCP connection to a session's VNC server, read without extra copies.

asyncio's ``StreamReader`` copies every byte twice (into its buffer, then out of it); the
relay moves every byte of every viewer, so it takes the chunks as the event loop read them.

A server that stops reading (hung, or gone behind a network that drops packets) must not
hold a relay forever: a write it takes nothing of for ``stall_timeout_s`` fails, and
closing drops the bytes it has not taken instead of waiting for them to go.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

from streamspace_sdk.protocol import MAX_BINARY_PAYLOAD_BYTES

__all__ = ["STALL_TIMEOUT_S", "VncConnection", "open_vnc_connection"]

HIGH_WATER_BYTES = 2 * MAX_BINARY_PAYLOAD_BYTES
"""Bytes read from the VNC server and not yet relayed at which reading pauses: a slow
viewer holds back the server through TCP instead of growing the agent's memory."""

STALL_TIMEOUT_S = 60.0
"""Seconds a write may wait for a server that takes none of its bytes: far above any pause
of a live server, and below the control plane's default ``VNC_PROXY_TIMEOUT`` (300 s),
after which it has closed the viewer anyway. The closing of a ``ws-dedicated`` stream
cannot reach a relay blocked writing to the server (the socket's reading is paused)."""


class VncConnection(asyncio.Protocol):
    """One TCP connection: ``read`` returns chunks as received, ``write`` waits for room.

    Args:
        stall_timeout_s: how long ``write`` waits for room before it gives up.
    """

    def __init__(self, stall_timeout_s: float = STALL_TIMEOUT_S) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._ended = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, hence the cast).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()
        if self._buffered >= HIGH_WATER_BYTES and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._ended = True
        self._readable.set()
        return False  # close the transport: VNC has no half-closed state

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._readable.set()
        self._writable.set()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the relay's side ----------------------------------------------------------------

    async def read(self) -> bytes:
        """Return what arrived (at most ``MAX_BINARY_PAYLOAD_BYTES``); ``b""`` at the end."""
        while not self._chunks:
            if self._ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        if self._chunks and len(data) < MAX_BINARY_PAYLOAD_BYTES:
            # Small RFB messages queued together go out as one frame.
            parts = [data]
            size = len(data)
            while self._chunks and size + len(self._chunks[0]) <= MAX_BINARY_PAYLOAD_BYTES:
                size += len(self._chunks[0])
                parts.append(self._chunks.popleft())
            data = b"".join(parts)
        self._buffered -= len(data)
        if self._paused and self._buffered < HIGH_WATER_BYTES // 2 and self._transport:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the socket's buffer is full.

        Raises:
            ConnectionError: the connection is closed, or the server took nothing for
                ``stall_timeout_s``.
        """
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("the VNC server's connection is closed")
        self._transport.write(data)
        if not self._writable.is_set():  # most writes find room: no timer on the hot path
            try:
                async with asyncio.timeout(self.stall_timeout_s):
                    await self._writable.wait()
            except TimeoutError:
                raise ConnectionError(
                    "the VNC server did not take the bytes sent to it within "
                    f"{self.stall_timeout_s:g}s"
                ) from None
        if self._closed.done():
            raise ConnectionError("the VNC server's connection is closed")

    async def close(self) -> None:
        """Close the connection and wait until it is gone.

        Bytes the server has not taken are dropped (a reset, not an end of file): they are
        a gone viewer's input, and a server that stopped reading would never take them.
        """
        if self._transport is not None:
            if self._transport.get_write_buffer_size():
                self._transport.abort()
            else:
                self._transport.close()
            await self._closed


async def open_vnc_connection(
    host: str, port: int, *, stall_timeout_s: float = STALL_TIMEOUT_S
) -> VncConnection:
    """Connect to a VNC server (raises ``OSError`` as ``asyncio.open_connection`` does)."""
    _, connection = await asyncio.get_running_loop().create_connection(
        lambda: VncConnection(stall_timeout_s), host, port
    )
    return connection
