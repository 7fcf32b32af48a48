"""A VNC viewer's side of RFB 3.8 (RFC 6143), for tests that read a session's screen.

Enough of the protocol to prove a desktop is readable pixel by pixel: the version handshake,
security type None, ClientInit and ServerInit, then whole frames in a pixel format of the
viewer's choosing (32-bit, the bytes R, G, B, 0) and Raw encoding. It speaks over a
``websockets`` client connection (the control plane's ``/vnc/{id}``, binary messages) or a
TCP connection (a session's VNC port)::

    screen = await read_screen(f"ws://127.0.0.1:8000/vnc/{session_id}?token={token}")
    assert (screen.width, screen.height) == (1280, 800)
    assert len(screen.colours()) > 1, "nothing is drawn"

A connection that ends mid-message raises :class:`EOFError` saying after how many bytes; a
server that breaks the protocol, or offers no security type None, fails with an
:class:`AssertionError` saying how.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

__all__ = [
    "RFB_VERSION",
    "PixelFormat",
    "RfbStream",
    "Screen",
    "ServerInit",
    "read_drawn_framebuffer",
    "read_framebuffer",
    "read_screen",
    "read_screen_tcp",
    "rfb_handshake",
    "rfb_tcp",
]

RFB_VERSION = b"RFB 003.008\n"
"""The ProtocolVersion message of RFB 3.8, the version this viewer speaks."""

_BANNER = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
_SECURITY_NONE = 1
_RAW = 0
_PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class PixelFormat:
    """A PIXEL_FORMAT (RFC 6143, 7.4): how the bits of a pixel encode its colour."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        """Read the 16 bytes of a PIXEL_FORMAT."""
        bits, depth, big_endian, true_colour, *rest = _PIXEL_FORMAT.unpack(data)
        return cls(bits, depth, bool(big_endian), bool(true_colour), *rest)

    def pack(self) -> bytes:
        """Return the 16 bytes of this PIXEL_FORMAT."""
        return _PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            self.big_endian,
            self.true_colour,
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )


_RGB0 = PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)
"""What :func:`read_framebuffer` asks for (noVNC asks the same): 32-bit little-endian pixels
with red in the lowest byte, so each pixel is the bytes R, G, B, 0."""


@dataclass(frozen=True)
class ServerInit:
    """What the server says about its desktop at the end of the handshake."""

    width: int
    """Framebuffer width, in pixels."""
    height: int
    """Framebuffer height, in pixels."""
    pixel_format: PixelFormat
    """The server's own pixel format, before the viewer asks for another."""
    name: str
    """The desktop's name."""


@dataclass(frozen=True)
class Screen:
    """One frame as a viewer read it: the area asked for and the desktop's name."""

    width: int
    """Width of the area read, in pixels (the framebuffer's, for a whole frame)."""
    height: int
    """Height of the area read, in pixels."""
    name: str
    """The desktop's name, from ServerInit."""
    pixels: bytes
    """Row-major, four bytes (R, G, B, 0) per pixel."""

    def rgb(self, x: int, y: int) -> tuple[int, int, int]:
        """Return the colour at column ``x``, row ``y``."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise IndexError(f"({x}, {y}) is outside the {self.width}x{self.height} screen")
        at = 4 * (y * self.width + x)
        red, green, blue = self.pixels[at : at + 3]
        return red, green, blue

    def colours(self) -> set[tuple[int, int, int]]:
        """Return every colour on the screen: a blank one has one."""
        return set(zip(self.pixels[0::4], self.pixels[1::4], self.pixels[2::4], strict=True))


class RfbStream:
    """One RFB connection: bytes written as they come, read in the sizes RFB asks for.

    A relay may split or join the server's writes in any way, so reads are buffered. Make
    one with :meth:`websocket` or :meth:`tcp`, or give ``receive`` (the next bytes, raising
    :class:`EOFError` at the end) and ``send``.
    """

    def __init__(
        self,
        receive: Callable[[], Awaitable[bytes]],
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        self._receive = receive
        self._send = send
        self._buffer = bytearray()

    @classmethod
    def websocket(cls, ws: ClientConnection) -> RfbStream:
        """Speak over the binary messages of a WebSocket; a text message fails the read."""

        async def receive() -> bytes:
            try:
                message = await ws.recv()
            except ConnectionClosed as closed:
                if closed.rcvd is None:
                    raise EOFError("the WebSocket closed without a close frame") from closed
                code, reason = closed.rcvd.code, closed.rcvd.reason
                raise EOFError(f"the WebSocket closed with {code} {reason!r}") from closed
            if isinstance(message, str):
                raise AssertionError(f"a text message where RFB bytes belong: {message[:80]!r}")
            return message

        return cls(receive, ws.send)

    @classmethod
    def tcp(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RfbStream:
        """Speak over a TCP connection (a VNC server's port); the caller closes it."""

        async def receive() -> bytes:
            try:
                data = await reader.read(_CHUNK)
            except ConnectionError as error:
                raise EOFError(f"the connection was reset ({error})") from error
            if not data:
                raise EOFError("the server closed the connection")
            return data

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        return cls(receive, send)

    async def read(self, size: int) -> bytes:
        """Return exactly ``size`` bytes.

        Raises:
            EOFError: The connection ended first; the message says after how many bytes.
        """
        while len(self._buffer) < size:
            try:
                self._buffer += await self._receive()
            except EOFError as end:
                raise EOFError(f"{end}, after {len(self._buffer)} of {size} bytes") from end
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` (one WebSocket message)."""
        await self._send(data)


@contextlib.asynccontextmanager
async def rfb_tcp(host: str, port: int) -> AsyncIterator[RfbStream]:
    """Connect to the VNC server at ``host``:``port``; close the connection on exit."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield RfbStream.tcp(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def rfb_handshake(stream: RfbStream) -> tuple[bytes, ServerInit]:
    """Do the version and security handshake (type None) and join the desktop, shared.

    Returns:
        The server's ProtocolVersion banner (12 bytes) and its ServerInit.

    Raises:
        AssertionError: The server speaks a version before 3.8, refuses the connection,
            offers no security type None, or fails it; the message says which (and the
            server's reason).
        EOFError: The connection ended first.
    """
    banner = await stream.read(len(RFB_VERSION))
    version = _BANNER.fullmatch(banner)
    if version is None:
        raise AssertionError(f"not an RFB ProtocolVersion: {banner!r}")
    major, minor = int(version[1]), int(version[2])
    if (major, minor) < (3, 8):
        raise AssertionError(f"the server speaks RFB {major}.{minor}; this viewer needs 3.8")
    await stream.write(RFB_VERSION)
    (count,) = await stream.read(1)
    if count == 0:
        raise AssertionError(f"the server refused the connection: {await _text(stream)}")
    types = list(await stream.read(count))
    if _SECURITY_NONE not in types:
        raise AssertionError(f"the server offers security types {types}, not None (1)")
    await stream.write(bytes([_SECURITY_NONE]))
    (result,) = struct.unpack(">I", await stream.read(4))
    if result != 0:
        raise AssertionError(f"security type None failed: {await _text(stream)}")
    await stream.write(b"\x01")  # ClientInit: shared, so other viewers stay connected
    width, height = struct.unpack(">HH", await stream.read(4))
    pixel_format = PixelFormat.unpack(await stream.read(_PIXEL_FORMAT.size))
    return banner, ServerInit(width, height, pixel_format, await _text(stream))


async def read_framebuffer(
    stream: RfbStream, init: ServerInit, *, region: tuple[int, int, int, int] | None = None
) -> Screen:
    """Read the whole screen, or ``region`` (x, y, width, height), as one :class:`Screen`.

    Asks for 32-bit pixels (R, G, B, 0), Raw encoding only and a full (not incremental)
    update of the area, then reads until rectangles have covered it: a server may answer
    with several updates of several rectangles. Bell, ServerCutText and SetColourMapEntries
    on the way are skipped. Call it again on the same stream for another frame.

    Raises:
        AssertionError: A rectangle is not Raw or lies outside the area, or the server sent
            a message type a viewer cannot skip.
        EOFError: The connection ended first.
    """
    left, top, width, height = region or (0, 0, init.width, init.height)
    await stream.write(
        struct.pack(">B3x", 0)  # SetPixelFormat
        + _RGB0.pack()
        + struct.pack(">BxHi", 2, 1, _RAW)  # SetEncodings: Raw only
        + struct.pack(">BBHHHH", 3, 0, left, top, width, height)  # FramebufferUpdateRequest
    )
    pixels = bytearray(4 * width * height)
    missing = width * height
    while missing > 0:
        (kind,) = await stream.read(1)
        if kind == 0:  # FramebufferUpdate
            (rectangles,) = struct.unpack(">xH", await stream.read(3))
            for _ in range(rectangles):
                x, y, w, h, encoding = struct.unpack(">HHHHi", await stream.read(12))
                if encoding != _RAW:
                    raise AssertionError(f"a rectangle in encoding {encoding}, not Raw (0)")
                if x < left or y < top or x + w > left + width or y + h > top + height:
                    raise AssertionError(
                        f"a {w}x{h} rectangle at ({x}, {y}), outside the {width}x{height} "
                        f"at ({left}, {top}) asked for"
                    )
                data = await stream.read(4 * w * h)
                for row in range(h):
                    at = 4 * ((y - top + row) * width + x - left)
                    pixels[at : at + 4 * w] = data[4 * w * row : 4 * w * (row + 1)]
                missing -= w * h
        elif kind == 1:  # SetColourMapEntries: 6 bytes a colour
            _, colours = struct.unpack(">xHH", await stream.read(5))  # first, count
            await stream.read(6 * colours)
        elif kind == 2:  # Bell
            continue
        elif kind == 3:  # ServerCutText
            await stream.read(3)
            await _text(stream)
        else:
            raise AssertionError(f"server message type {kind}, which a viewer cannot skip")
    return Screen(width, height, init.name, bytes(pixels))


async def read_drawn_framebuffer(stream: RfbStream, init: ServerInit) -> Screen:
    """Read whole frames until one shows more than one colour, and return it.

    An X server's screen is one colour until its first client draws, and a session may be
    running before its desktop has drawn; bound the wait with a timeout around the call.
    """
    while True:
        screen = await read_framebuffer(stream, init)
        if len(screen.colours()) > 1:
            return screen


async def read_screen(url: str, *, timeout_s: float = 30.0, drawn: bool = False) -> Screen:
    """Connect to a viewer URL as noVNC does and read one whole frame.

    Args:
        url: ``ws://host:port/vnc/{session_id}?token=...``; a token serves one call.
        timeout_s: Bound on the whole exchange, so a stalled server fails the test.
        drawn: Read frames until one shows more than one colour
            (:func:`read_drawn_framebuffer`).
    """
    where = url.partition("?")[0]  # the token stays out of messages
    async with (
        _named(where, timeout_s, drawn),
        asyncio.timeout(timeout_s),
        connect(url, subprotocols=[Subprotocol("binary")], compression=None, max_size=None) as ws,
    ):
        stream = RfbStream.websocket(ws)
        _, init = await rfb_handshake(stream)
        read = read_drawn_framebuffer if drawn else read_framebuffer
        return await read(stream, init)


async def read_screen_tcp(
    host: str, port: int, *, timeout_s: float = 30.0, drawn: bool = False
) -> Screen:
    """Connect to the VNC server at ``host``:``port`` and read one whole frame.

    Args:
        timeout_s: Bound on the whole exchange, so a stalled server fails the test.
        drawn: Read frames until one shows more than one colour.
    """
    async with (
        _named(f"{host}:{port}", timeout_s, drawn),
        asyncio.timeout(timeout_s),
        rfb_tcp(host, port) as stream,
    ):
        _, init = await rfb_handshake(stream)
        read = read_drawn_framebuffer if drawn else read_framebuffer
        return await read(stream, init)


@contextlib.asynccontextmanager
async def _named(where: str, timeout_s: float, drawn: bool) -> AsyncIterator[None]:
    """Say which server did not give a frame in time (the timeout's own error is bare)."""
    try:
        yield
    except TimeoutError as error:
        frame = "drawn frame" if drawn else "whole frame"
        raise TimeoutError(f"no {frame} from {where} within {timeout_s:g}s") from error


async def _text(stream: RfbStream) -> str:
    """Read a U32 length and that many bytes of text: a reason, a name, a cut text."""
    (length,) = struct.unpack(">I", await stream.read(4))
    return (await stream.read(length)).decode("utf-8", "replace")
