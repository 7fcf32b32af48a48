"""A custom StreamSpace agent in one file: the SDK's agent runtime with a platform of its own.

Each session of the ``pattern`` platform is a tiny VNC server inside this process that
shows colour bars, so the agent needs no program beyond Python. Replace ``PatternPlatform``
with your own (or ``streamspace_example_qemu.QemuPlatform``) and keep the rest.

Run it against a control plane (``pip install streamspace-sdk`` is all it needs)::

    AGENT_ID=pattern-1 CONTROL_PLANE_URL=ws://127.0.0.1:8080 AGENT_TOKEN=... python agent.py

and start sessions of a template with ``"platform": "pattern"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from typing import ClassVar

from pydantic import Field

from streamspace_sdk import (
    Agent,
    AgentSettings,
    Capacity,
    Platform,
    PlatformError,
    SessionNotFound,
    SessionSpec,
    SessionStatus,
    StreamSpaceError,
    VncEndpoint,
    load_settings,
)

WIDTH, HEIGHT = 320, 240
BARS = [(255, 255, 255), (255, 255, 0), (0, 255, 255), (0, 255, 0)]
BARS += [(255, 0, 255), (255, 0, 0), (0, 0, 255), (0, 0, 0)]
"""Eight bars, 40 pixels wide each: white, yellow, cyan, green, magenta, red, blue, black."""
# ServerInit's pixel format: 32 bits per pixel, depth 24, little-endian, true colour,
# red, green and blue maximum 255, at bit shifts 16, 8 and 0.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


def frame(pixel_format: bytes) -> bytes:
    """The colour bars in ``pixel_format`` (32 bits per pixel, true colour only)."""
    _, _, big_endian, _, r_max, g_max, b_max, r_shift, g_shift, b_shift = struct.unpack(
        ">BBBBHHHBBB3x", pixel_format
    )
    order = ">I" if big_endian else "<I"
    bar = [
        struct.pack(
            order,
            (r * r_max // 255) << r_shift
            | (g * g_max // 255) << g_shift
            | (b * b_max // 255) << b_shift,
        )
        for r, g, b in BARS
    ]
    return b"".join(pixel * (WIDTH // len(BARS)) for pixel in bar) * HEIGHT


async def serve_viewer(name: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Speak just enough RFB 3.8 (RFC 6143) to one viewer: no password, Raw encoding."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        w.write(b"RFB 003.008\n")
        await reader.readexactly(12)  # the client's version
        w.write(b"\x01\x01")  # one security type: None (only the agent reaches 127.0.0.1)
        if await reader.readexactly(1) != b"\x01":
            return
        w.write(b"\0\0\0\0")  # SecurityResult: OK
        await reader.readexactly(1)  # ClientInit
        w.write(struct.pack(">HH", WIDTH, HEIGHT) + PIXEL_FORMAT + struct.pack(">I", len(name)))
        w.write(name)
        pixels = frame(PIXEL_FORMAT)
        while True:
            kind = (await reader.readexactly(1))[0]
            if kind == 0:  # SetPixelFormat
                wanted = (await reader.readexactly(19))[3:]
                if wanted[0] != 32 or not wanted[3]:
                    return  # a real server would convert; this one only does 32-bit colour
                pixels = frame(wanted)
            elif kind == 2:  # SetEncodings: Raw is always allowed, and all we send
                (count,) = struct.unpack(">xH", await reader.readexactly(3))
                await reader.readexactly(4 * count)
            elif kind == 3:  # FramebufferUpdateRequest
                incremental = (await reader.readexactly(9))[0]
                if not incremental:  # the picture never changes: answer only full requests
                    rect = struct.pack(">HHHHi", 0, 0, WIDTH, HEIGHT, 0)
                    w.write(b"\0\0\0\x01" + rect + pixels)
            elif kind in (4, 5):  # KeyEvent, PointerEvent: ignored
                await reader.readexactly(7 if kind == 4 else 5)
            elif kind == 6:  # ClientCutText
                (length,) = struct.unpack(">3xI", await reader.readexactly(7))
                await reader.readexactly(length)
            else:
                return
            await w.drain()
    w.close()


class Session:
    """One running session: its VNC server and the viewers connected to it."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.viewers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def open(self, name: bytes) -> None:
        async def viewer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.viewers.add(writer)
            try:
                await serve_viewer(name, reader, writer)
            finally:
                self.viewers.discard(writer)

        self.server = await asyncio.start_server(viewer, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.viewers):
            writer.close()  # the viewers of a stopped session are cut off
        await self.server.wait_closed()


class PatternPlatform(Platform):
    """Sessions are VNC servers in this process, so they end with it (no ``adopt``)."""

    name: ClassVar[str] = "pattern"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    class Settings(Platform.Settings):
        max_sessions: int = Field(default=10, ge=0)
        """``MAX_SESSIONS``: sessions this process runs at once."""

    def __init__(self, settings: Settings | None = None, *, agent_id: str) -> None:
        config = settings if settings is not None else PatternPlatform.Settings()
        super().__init__(config, agent_id=agent_id)
        self.config = config
        self.sessions: dict[str, Session] = {}

    async def _start(self, spec: SessionSpec) -> SessionStatus:
        if spec.image or spec.command:
            raise PlatformError("the pattern platform runs no image or command; unset them")
        if (running := self.sessions.get(spec.session_id)) is not None:
            running.generation = spec.generation  # running under an older generation: keep it
            return self._observe(spec.session_id)
        if len(self.sessions) >= self.config.max_sessions:
            raise PlatformError(f"{len(self.sessions)} sessions run, the most MAX_SESSIONS allows")
        session = Session(spec.generation)
        await session.open(f"pattern {spec.session_id}".encode())
        self.sessions[spec.session_id] = session
        return self._observe(spec.session_id)

    async def _stop(self, session_id: str, generation: int) -> SessionStatus:
        if (session := self.sessions.pop(session_id, None)) is not None:
            await session.close()
        return SessionStatus(session_id=session_id, generation=generation, state="stopped")

    async def _status(self, session_id: str) -> SessionStatus | None:
        return self._observe(session_id) if session_id in self.sessions else None

    async def _list_sessions(self) -> list[SessionStatus]:
        return [self._observe(session_id) for session_id in self.sessions]

    async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
        status = await self._status(session_id)
        if status is None or status.vnc is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return status.vnc

    async def _capacity(self) -> Capacity:
        return Capacity(max_sessions=self.config.max_sessions)

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.close()
        self.sessions.clear()

    def _observe(self, session_id: str) -> SessionStatus:
        session = self.sessions[session_id]
        assert session.server is not None
        port = session.server.sockets[0].getsockname()[1]
        return SessionStatus(
            session_id=session_id,
            generation=session.generation,
            state="running",
            vnc=VncEndpoint(host="127.0.0.1", port=port),
        )


def main() -> int:
    """Run the agent with the settings in the environment until SIGTERM or SIGINT."""
    try:
        settings = load_settings(AgentSettings)  # AGENT_ID, CONTROL_PLANE_URL, AGENT_TOKEN...
        Agent(settings, platform=PatternPlatform(agent_id=settings.agent_id)).run()
    except StreamSpaceError as exc:  # a bad setting names its variable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
