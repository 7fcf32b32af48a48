"""The kit's RFB viewer against a real Xvnc over TCP and through a WebSocket relay, and
against made-up servers that close early or break the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from streamspace_sdk.platform import SessionSpec
from streamspace_sdk.platforms import ProcessPlatform
from streamspace_sdk.testing import (
    RFB_VERSION,
    PixelFormat,
    Screen,
    read_framebuffer,
    read_screen,
    read_screen_tcp,
    rfb_handshake,
    rfb_tcp,
)

pytestmark = pytest.mark.asyncio

SIZE = (320, 240)
ORANGE = (255, 128, 0)
"""The xterm's background: red, green and blue all differ, so a viewer that got them in
another order (Xvnc's own is B, G, R, 0) sees another colour."""
BLUE = (0, 0, 255)
"""The xterm's text (its shell prompt) and cursor."""
SESSION = "rfb"


@dataclass
class Vnc:
    host: str
    port: int


@pytest_asyncio.fixture
async def vnc(tmp_path: Path) -> AsyncIterator[Vnc]:
    """A real Xvnc of :data:`SIZE` (the ``process`` platform's default command), with an
    orange xterm covering the screen, blue text at its top left."""
    if shutil.which("Xvnc") is None or shutil.which("xterm") is None:
        pytest.fail("Xvnc or xterm missing: apt-get install tigervnc-standalone-server xterm")
    client = tmp_path / "x-client"
    client.write_text(
        "#!/bin/sh\nexec xterm -bw 0 -geometry 100x40+0+0 -bg '#ff8000' -fg '#0000ff'\n"
    )
    client.chmod(0o755)
    platform = ProcessPlatform(
        ProcessPlatform.Settings(
            process_state_dir=tmp_path / "state",
            process_geometry="x".join(map(str, SIZE)),
            process_x_client=str(client),
            process_start_timeout=15.0,
            process_stop_timeout=1.0,
        ),
        agent_id="rfb-test",
    )
    status = await platform.start(
        SessionSpec(session_id=SESSION, generation=1, user="alice", template="t")
    )
    try:
        assert status.vnc is not None
        yield Vnc(status.vnc.host, status.vnc.port)
    finally:
        await platform.stop(SESSION, 2)


async def drawn(vnc: Vnc, timeout_s: float = 15.0) -> Screen:
    """Read whole frames until the xterm has drawn its text (black, then orange, until then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        screen = await read_screen_tcp(vnc.host, vnc.port)
        if {ORANGE, BLUE} <= screen.colours():
            return screen
        assert time.monotonic() < deadline, f"never drawn: colours {screen.colours()}"
        await asyncio.sleep(0.1)


def crop(screen: Screen, left: int, top: int, width: int, height: int) -> bytes:
    rows = (
        screen.pixels[4 * ((top + y) * screen.width + left) :][: 4 * width] for y in range(height)
    )
    return b"".join(rows)


# -- against Xvnc ----------------------------------------------------------------------------


async def test_handshake_returns_the_banner_and_server_init(vnc: Vnc) -> None:
    async with rfb_tcp(vnc.host, vnc.port) as stream:
        banner, init = await rfb_handshake(stream)
    assert banner == RFB_VERSION
    assert (init.width, init.height, init.name) == (*SIZE, f"streamspace-{SESSION}")
    own = init.pixel_format
    assert (own.bits_per_pixel, own.depth, own.true_colour) == (32, 24, True)
    assert (own.red_shift, own.green_shift, own.blue_shift) == (16, 8, 0)  # not R, G, B, 0
    assert PixelFormat.unpack(own.pack()) == own


async def test_a_whole_frame_comes_in_the_pixel_format_asked_for(vnc: Vnc) -> None:
    screen = await drawn(vnc)
    assert (screen.width, screen.height, screen.name) == (*SIZE, f"streamspace-{SESSION}")
    assert len(screen.pixels) == 4 * SIZE[0] * SIZE[1]
    assert screen.pixels[3::4] == bytes(SIZE[0] * SIZE[1]), "the fourth byte is padding"
    assert screen.rgb(SIZE[0] - 1, SIZE[1] - 1) == ORANGE
    assert screen.colours() == {ORANGE, BLUE}
    with pytest.raises(IndexError):
        screen.rgb(SIZE[0], 0)


async def test_drawn_reads_until_the_desktop_shows_more_than_one_colour(vnc: Vnc) -> None:
    """The session is running once Xvnc answers, before the xterm has drawn (the screen is
    black): ``drawn=True`` returns a frame the xterm has drawn on."""
    screen = await read_screen_tcp(vnc.host, vnc.port, timeout_s=15, drawn=True)
    assert len(screen.colours()) > 1
    assert ORANGE in screen.colours()


async def test_regions_and_frames_follow_one_another_on_one_connection(vnc: Vnc) -> None:
    """Regions read on the connection that read the whole screen are those parts of it."""
    await drawn(vnc)
    corner, offset = (0, 0, 64, 48), (3, 5, 50, 20)
    async with rfb_tcp(vnc.host, vnc.port) as stream:
        _, init = await rfb_handshake(stream)
        for _ in range(20):
            before = await read_framebuffer(stream, init)
            parts = [await read_framebuffer(stream, init, region=r) for r in (corner, offset)]
            after = await read_framebuffer(stream, init)
            if before == after:  # the cursor may blink; compare once it held still
                break
        else:
            pytest.fail("the screen never held still for three reads")
    for part, (left, top, width, height) in zip(parts, (corner, offset), strict=True):
        assert (part.width, part.height, part.name) == (width, height, init.name)
        assert part.pixels == crop(before, left, top, width, height)
        assert part.colours() == {ORANGE, BLUE}  # the prompt is in both


@contextlib.asynccontextmanager
async def websocket_relay(vnc: Vnc) -> AsyncIterator[str]:
    """A ``/vnc``-like WebSocket in front of the VNC port that cuts the server's bytes into
    messages of 1, 7, 1000 and 4093 bytes in turn; yields a viewer URL."""
    sizes = itertools.cycle([1, 7, 1000, 4093])

    async def relay(ws: ServerConnection) -> None:
        assert ws.subprotocol == "binary"
        reader, writer = await asyncio.open_connection(vnc.host, vnc.port)

        async def down() -> None:
            while data := await reader.read(65536):
                while data:
                    size = next(sizes)
                    await ws.send(data[:size])
                    data = data[size:]

        to_viewer = asyncio.create_task(down())
        try:
            async for message in ws:
                assert isinstance(message, bytes)
                writer.write(message)
        finally:
            to_viewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await to_viewer
            writer.close()

    async with serve(relay, "127.0.0.1", 0, subprotocols=[Subprotocol("binary")]) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/vnc/{SESSION}?token=made-up"


async def test_read_screen_through_a_websocket_equals_the_vnc_port(vnc: Vnc) -> None:
    await drawn(vnc)
    async with websocket_relay(vnc) as url:
        for _ in range(20):
            before = await read_screen_tcp(vnc.host, vnc.port)
            through = await read_screen(url)
            after = await read_screen_tcp(vnc.host, vnc.port)
            if before == after:
                break
        else:
            pytest.fail("the screen never held still for three reads")
    assert through == before
    assert through.colours() == {ORANGE, BLUE}


# -- against made-up servers -----------------------------------------------------------------

Step = bytes | int
"""What a made-up server does next: send these bytes, or read this many."""
BANNER = RFB_VERSION
NONE_OK: list[Step] = [BANNER, 12, b"\x01\x01", 1, b"\0\0\0\0"]
"""Version, security type None offered, chosen, and a SecurityResult of OK."""
NATIVE = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
REQUESTS = 20 + 8 + 10
"""What a viewer sends for a frame: SetPixelFormat, SetEncodings, FramebufferUpdateRequest."""


def server_init(width: int, height: int, name: bytes = b"fake") -> bytes:
    return struct.pack(">HH", width, height) + NATIVE + struct.pack(">I", len(name)) + name


def rectangle(x: int, y: int, pixels: Sequence[bytes], encoding: int = 0) -> bytes:
    return struct.pack(">HHHHi", x, y, len(pixels), 1, encoding) + b"".join(pixels)


def text(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


FRAME_ASKED: list[Step] = [*NONE_OK, 1, server_init(4, 2), REQUESTS]
"""The handshake, ClientInit, a 4x2 ServerInit and the viewer's requests for a frame."""


@contextlib.asynccontextmanager
async def made_up_server(steps: list[Step], heard: list[bytes]) -> AsyncIterator[int]:
    """A TCP server that plays ``steps`` on each connection, then closes it; what it read
    goes to ``heard``. Yields its port."""

    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for step in steps:
                if isinstance(step, int):
                    heard.append(await reader.readexactly(step))
                else:
                    writer.write(step)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the viewer gave up first
        finally:
            writer.close()

    server = await asyncio.start_server(play, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_a_frame_in_several_updates_past_bells_cut_text_and_colour_maps() -> None:
    """A 4x2 screen in two updates (two rectangles, then one), with a Bell, a ServerCutText
    and a SetColourMapEntries before them; and the viewer's requests as RFC 6143 words them."""
    a, b, c, d = b"\x01\x02\x03\0", b"\x04\x05\x06\0", b"\x07\x08\x09\0", b"\x0a\x0b\x0c\0"
    steps: list[Step] = [
        *FRAME_ASKED,
        b"\x02",  # Bell
        b"\x03\0\0\0" + text(b"copied"),  # ServerCutText
        b"\x01\0" + struct.pack(">HH", 0, 1) + b"\xff\xff\0\0\0\0",  # SetColourMapEntries
        b"\0\0" + struct.pack(">H", 2) + rectangle(0, 0, [a, b]) + rectangle(2, 0, [c, d]),
        b"\0\0" + struct.pack(">H", 1) + rectangle(0, 1, [d, c, b, a]),
    ]
    heard: list[bytes] = []
    async with made_up_server(steps, heard) as port:
        screen = await read_screen_tcp("127.0.0.1", port, timeout_s=5)
    assert (screen.width, screen.height, screen.name) == (4, 2, "fake")
    assert screen.pixels == a + b + c + d + d + c + b + a
    assert screen.rgb(2, 0) == (7, 8, 9)
    assert screen.rgb(0, 1) == (10, 11, 12)
    assert heard[:3] == [RFB_VERSION, b"\x01", b"\x01"]  # version, None, shared
    requests = heard[3]
    assert requests[:4] == b"\0\0\0\0"  # SetPixelFormat
    asked = PixelFormat.unpack(requests[4:20])
    assert asked == PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)
    assert requests[20:28] == b"\x02\0\0\x01\0\0\0\0"  # SetEncodings: Raw only
    assert requests[28:] == b"\x03\0" + struct.pack(">HHHH", 0, 0, 4, 2)  # all, not incremental


@pytest.mark.parametrize(
    ("steps", "error", "message"),
    [
        pytest.param(
            [b"RFB 003"], EOFError, "closed the connection, after 7 of 12 bytes", id="mid-banner"
        ),
        pytest.param(
            [BANNER, 12], EOFError, "closed the connection, after 0 of 1 bytes", id="mid-handshake"
        ),
        pytest.param(
            [BANNER, 12, b"\x01\x01", 1, b"\0\0"], EOFError, "after 2 of 4 bytes", id="mid-result"
        ),
        pytest.param(
            [BANNER, 12, b"\x02\x02\x10"],
            AssertionError,
            r"offers security types \[2, 16\], not None \(1\)",
            id="no-none",
        ),
        pytest.param(
            [BANNER, 12, b"\0" + text(b"too many viewers")],
            AssertionError,
            "refused the connection: too many viewers",
            id="refused",
        ),
        pytest.param(
            [BANNER, 12, b"\x01\x01", 1, b"\0\0\0\x01" + text(b"not today")],
            AssertionError,
            "security type None failed: not today",
            id="security-failed",
        ),
        pytest.param(
            [b"RFB 003.003\n"],
            AssertionError,
            "speaks RFB 3.3; this viewer needs 3.8",
            id="rfb-3.3",
        ),
        pytest.param([b"HTTP/1.1 400"], AssertionError, "not an RFB ProtocolVersion", id="not-rfb"),
        pytest.param(
            [*FRAME_ASKED, b"\0\0\0\x01" + rectangle(0, 0, [b"\0" * 4], 16)],
            AssertionError,
            r"a rectangle in encoding 16, not Raw \(0\)",
            id="not-raw",
        ),
        pytest.param(
            [*FRAME_ASKED, b"\0\0\0\x01" + rectangle(3, 1, [b"\0" * 4] * 2)],
            AssertionError,
            r"a 2x1 rectangle at \(3, 1\), outside the 4x2 at \(0, 0\) asked for",
            id="outside",
        ),
        pytest.param(
            [*FRAME_ASKED, b"\x09"],
            AssertionError,
            "server message type 9, which a viewer cannot skip",
            id="unknown-message",
        ),
    ],
)
async def test_a_server_that_closes_early_or_breaks_the_protocol_is_named_clearly(
    steps: list[Step], error: type[Exception], message: str
) -> None:
    async with made_up_server(steps, []) as port:
        with pytest.raises(error, match=message):
            await read_screen_tcp("127.0.0.1", port, timeout_s=5)


async def test_a_server_that_stops_talking_times_out_naming_it() -> None:
    async with made_up_server([BANNER, 12, 1], []) as port:  # waits for bytes never sent
        with pytest.raises(
            TimeoutError, match=rf"no whole frame from 127.0.0.1:{port} within 0.2s"
        ):
            await read_screen_tcp("127.0.0.1", port, timeout_s=0.2)


@pytest.mark.parametrize(
    ("close", "error", "message"),
    [
        (True, EOFError, r"the WebSocket closed with 4408 'idle', after 6 of 12 bytes"),
        (False, AssertionError, r"a text message where RFB bytes belong: 'RFB 003.008\\n'"),
    ],
)
async def test_a_websocket_that_closes_or_sends_text_is_named_clearly(
    close: bool, error: type[Exception], message: str
) -> None:
    async def talk(ws: ServerConnection) -> None:
        if close:
            await ws.send(b"RFB 00")
            await ws.close(4408, "idle")
        else:
            await ws.send(RFB_VERSION.decode())
            await ws.wait_closed()

    async with serve(talk, "127.0.0.1", 0, subprotocols=[Subprotocol("binary")]) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/vnc/x?token=secret"
        with pytest.raises(error, match=message):
            await read_screen(url, timeout_s=5)
