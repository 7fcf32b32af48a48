"""A VNC viewer's side of RFB 3.8 (RFC 6143), over the control plane's ``/vnc/{id}``
WebSocket: enough to prove a session's screen is readable, pixel by pixel."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

RFB_VERSION = b"RFB 003.008\n"
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
"""What the viewer asks for (noVNC asks the same): 32-bit little-endian pixels with red in
the lowest byte, so each pixel is the bytes R, G, B, 0."""


@dataclass(frozen=True)
class Screen:
    """What a viewer read: ServerInit's size and name, and one whole frame."""

    width: int
    height: int
    name: str
    pixels: bytes
    """Row-major, four bytes (R, G, B, 0) per pixel."""

    def rgb(self, x: int, y: int) -> tuple[int, int, int]:
        at = 4 * (y * self.width + x)
        r, g, b = self.pixels[at : at + 3]
        return r, g, b

    def colours(self) -> set[bytes]:
        return {self.pixels[i : i + 3] for i in range(0, len(self.pixels), 4)}


class _Stream:
    """Bytes from WebSocket binary messages, read in the sizes RFB asks for: the relay
    may split or join the server's writes in any way."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = bytearray()

    async def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            message = await self.ws.recv()
            assert isinstance(message, bytes), f"a text message on a VNC socket: {message!r}"
            self.buffer += message
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


async def read_screen(url: str) -> Screen:
    """Connect to ``url`` (``ws://.../vnc/{id}?token=...``), do the RFB handshake with
    security type None, and read one whole frame in :data:`PIXEL_FORMAT`, Raw encoding."""
    binary = [Subprotocol("binary")]  # what noVNC asks for
    async with connect(url, subprotocols=binary, max_size=None, open_timeout=10) as ws:
        rfb = _Stream(ws)
        banner = await rfb.read(12)
        assert banner == RFB_VERSION, banner
        await ws.send(RFB_VERSION)
        (count,) = await rfb.read(1)
        assert count, f"the server refused the handshake: {await rfb.read(4)!r}"
        types = await rfb.read(count)
        assert 1 in types, f"security types {list(types)} lack None (1)"
        await ws.send(b"\x01")
        assert await rfb.read(4) == b"\0\0\0\0", "SecurityResult is not OK"
        await ws.send(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", await rfb.read(4))
        await rfb.read(16)  # the server's pixel format; we ask for ours
        (name_length,) = struct.unpack(">I", await rfb.read(4))
        name = (await rfb.read(name_length)).decode()
        await ws.send(b"\0\0\0\0" + PIXEL_FORMAT)  # SetPixelFormat
        await ws.send(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: Raw only
        await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # the whole screen
        frame = bytearray(4 * width * height)
        missing = width * height
        while missing > 0:  # a server may answer with several updates of several rectangles
            kind = (await rfb.read(1))[0]
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                (length,) = struct.unpack(">3xI", await rfb.read(7))
                await rfb.read(length)
                continue
            assert kind == 0, f"unexpected server message type {kind}"
            (rects,) = struct.unpack(">xH", await rfb.read(3))
            for _ in range(rects):
                x, y, w, h, encoding = struct.unpack(">HHHHi", await rfb.read(12))
                assert encoding == 0, f"encoding {encoding}, not the Raw asked for"
                data = await rfb.read(4 * w * h)
                for row in range(h):
                    at = 4 * ((y + row) * width + x)
                    frame[at : at + 4 * w] = data[4 * w * row : 4 * w * (row + 1)]
                missing -= w * h
        return Screen(width, height, name, bytes(frame))
