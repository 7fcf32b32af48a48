"""Test doubles shipped with the kit: an in-memory platform and in-memory byte streams."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
from collections import deque
from typing import ClassVar

from streamspace_sdk.errors import PlatformError, SessionNotFound, StreamSpaceError
from streamspace_sdk.platform import (
    Capacity,
    Platform,
    SessionSpec,
    SessionStatus,
    VncEndpoint,
)
from streamspace_sdk.protocol import Command, CommandResult
from streamspace_sdk.settings import StreamSpaceSettings
from streamspace_sdk.transport import DEFAULT_WINDOW_BYTES, ByteStream

__all__ = [
    "MemoryByteStream",
    "MemoryHomeProbe",
    "MemoryPlatform",
    "MemoryPlatformState",
    "memory_stream_pair",
]

RFB_BANNER = b"RFB 003.008\n"


class MemoryPlatformState:
    """What a :class:`MemoryPlatform` "runs", shared by re-created objects like a real host.

    Args:
        max_sessions: How many sessions may run at once.
        screen: The (width, height) of a screen that the sessions' VNC server serves to RFB
            viewers (security type None, Raw: left half grey, right half white). Without
            one, the server sends the RFB banner and hangs up.
    """

    def __init__(self, max_sessions: int = 10, *, screen: tuple[int, int] | None = None) -> None:
        self.max_sessions = max_sessions
        self.screen = screen
        self.sessions: dict[str, SessionStatus] = {}
        self.homes: dict[str, dict[str, str]] = {}
        """Per-user files that outlive sessions (a stand-in for a persistent home)."""
        self.fail_next_start: str | None = None
        """Set to a reason to make the next start fail, leaving nothing behind."""
        self.starts = 0
        """How many times the driver really started something (idempotency shows here)."""
        self._server: asyncio.Server | None = None

    async def vnc_port(self) -> int:
        """Return the port of a tiny RFB 3.8 server (see ``screen``)."""
        if self._server is None:
            serve = _greet if self.screen is None else functools.partial(_serve, self.screen)
            self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop the greeting server."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def _greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(RFB_BANNER)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


_RGB0 = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
"""The pixel format served: 32 bits, the bytes R, G, B, 0 (what viewers such as noVNC ask)."""


async def _serve(
    screen: tuple[int, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve ``screen`` to one viewer: the handshake with security type None, then a Raw
    rectangle for each FramebufferUpdateRequest; other client messages are read and ignored
    (a SetPixelFormat too: pixels always come as :data:`_RGB0`)."""
    width, height = screen
    row = b"\x80\x80\x80\0" * (width // 2) + b"\xff\xff\xff\0" * (width - width // 2)
    skip = {4: 7, 5: 5}  # KeyEvent, PointerEvent: their sizes after the type
    try:
        writer.write(RFB_BANNER)
        await reader.readexactly(12)
        writer.write(b"\x01\x01")  # one security type: None
        await reader.readexactly(1)
        writer.write(b"\0\0\0\0")  # SecurityResult: OK
        await reader.readexactly(1)  # ClientInit
        name = b"memory"
        writer.write(struct.pack(">HH", width, height) + _RGB0 + struct.pack(">I", len(name)))
        writer.write(name)
        while True:
            (kind,) = await reader.readexactly(1)
            if kind == 0:  # SetPixelFormat
                await reader.readexactly(19)
            elif kind == 2:  # SetEncodings
                (count,) = struct.unpack(">xH", await reader.readexactly(3))
                await reader.readexactly(4 * count)
            elif kind == 3:  # FramebufferUpdateRequest
                _, x, y, w, h = struct.unpack(">BHHHH", await reader.readexactly(9))
                x, y = min(x, width), min(y, height)
                w, h = min(w, width - x), min(h, height - y)
                pixels = row[4 * x : 4 * (x + w)] * h
                writer.write(struct.pack(">BxHHHHHi", 0, 1, x, y, w, h, 0) + pixels)
            elif kind == 6:  # ClientCutText
                (length,) = struct.unpack(">3xI", await reader.readexactly(7))
                await reader.readexactly(length)
            elif kind in skip:
                await reader.readexactly(skip[kind])
            else:
                break
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class MemoryPlatform(Platform):
    """A platform that runs nothing: sessions are records in a :class:`MemoryPlatformState`.

    For testing agents and control planes without a real platform. Each session's VNC
    endpoint is a local server that sends the RFB banner and closes, or serves a screen
    (``MemoryPlatformState(screen=...)``).
    """

    name = "memory"
    capabilities: ClassVar[frozenset[str]] = frozenset({"hibernate", "persistent_home", "adopt"})

    def __init__(
        self,
        settings: StreamSpaceSettings | None = None,
        *,
        agent_id: str,
        state: MemoryPlatformState | None = None,
    ) -> None:
        super().__init__(settings, agent_id=agent_id)
        self.state = state if state is not None else MemoryPlatformState()

    async def carry_out(self, command: Command) -> CommandResult:
        """Carry out ``command`` as an agent would (no hooks, no retries) and return the
        result to send: for simulated agents that speak the protocol themselves."""
        try:
            if command.action in ("start", "wake"):
                assert command.spec is not None  # Command refuses a start or wake without one
                run = self.start if command.action == "start" else self.wake
                status = await run(command.spec)
            elif command.action == "hibernate":
                status = await self.hibernate(command.session_id, command.generation)
            else:
                status = await self.stop(command.session_id, command.generation)
        except StreamSpaceError as exc:
            return command.result(reason=str(exc) or type(exc).__name__)
        return command.result(status)

    async def _start(self, spec: SessionSpec) -> SessionStatus:
        if self.state.fail_next_start is not None:
            reason, self.state.fail_next_start = self.state.fail_next_start, None
            raise PlatformError(reason)
        active = sum(1 for s in self.state.sessions.values() if s.state == "running")
        if active >= self.state.max_sessions:
            raise PlatformError(f"capacity full: {active} of {self.state.max_sessions} sessions")
        self.state.starts += 1
        self.state.homes.setdefault(spec.user, {})
        return self._set(spec.session_id, spec.generation, "running", spec.user)

    async def _stop(self, session_id: str, generation: int) -> SessionStatus:
        status = self._set(session_id, generation, "stopped")
        del self.state.sessions[session_id]
        return status

    async def _hibernate(self, session_id: str, generation: int) -> SessionStatus:
        return self._set(session_id, generation, "hibernated")

    async def _wake(self, spec: SessionSpec) -> SessionStatus:
        return self._set(spec.session_id, spec.generation, "running")

    async def _status(self, session_id: str) -> SessionStatus | None:
        return self.state.sessions.get(session_id)

    async def _list_sessions(self) -> list[SessionStatus]:
        return list(self.state.sessions.values())

    async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
        status = self.state.sessions.get(session_id)
        if status is None or status.state != "running":
            raise SessionNotFound(f"session {session_id!r} is not running")
        return VncEndpoint(host="127.0.0.1", port=await self.state.vnc_port())

    async def _capacity(self) -> Capacity:
        return Capacity(max_sessions=self.state.max_sessions)

    def _set(
        self, session_id: str, generation: int, state: str, user: str | None = None
    ) -> SessionStatus:
        old = self.state.sessions.get(session_id)
        meta = {"user": user or (old.platform_metadata.get("user") if old else "")}
        status = SessionStatus.model_validate(
            {
                "session_id": session_id,
                "generation": generation,
                "state": state,
                "platform_metadata": meta,
            }
        )
        self.state.sessions[session_id] = status
        return status


class MemoryHomeProbe:
    """The ``home_probe`` of :class:`MemoryPlatform`: its homes are dicts per user.

    Return one from a ``home_probe`` fixture to run the kit's home tests against the double.
    """

    async def write(self, platform: Platform, session_id: str, name: str, content: str) -> None:
        """Write ``content`` to ``name`` in the home of the session's user."""
        self._home(platform, session_id)[name] = content

    async def read(self, platform: Platform, session_id: str, name: str) -> str | None:
        """Return ``name`` from the home of the session's user, or ``None``."""
        return self._home(platform, session_id).get(name)

    @staticmethod
    def _home(platform: Platform, session_id: str) -> dict[str, str]:
        if not isinstance(platform, MemoryPlatform):
            raise TypeError(f"MemoryHomeProbe works with MemoryPlatform, not {platform!r}")
        status = platform.state.sessions.get(session_id)
        if status is None:
            raise SessionNotFound(f"session {session_id!r} is not known")
        return platform.state.homes.setdefault(str(status.platform_metadata["user"]), {})


class _Direction:
    """One direction of an in-memory stream: a buffer bounded by the reader's window."""

    def __init__(self, window_bytes: int) -> None:
        self.window = window_bytes
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.closed = False
        self.changed = asyncio.Condition()


class MemoryByteStream(ByteStream):
    """One end of an in-memory stream pair with the flow control a transport must have."""

    def __init__(self, inbound: _Direction, outbound: _Direction) -> None:
        self._in = inbound
        self._out = outbound

    @property
    def buffered_bytes(self) -> int:
        """Bytes written by this end that the peer has not read yet."""
        return self._out.buffered

    async def read(self) -> bytes:
        async with self._in.changed:
            await self._in.changed.wait_for(lambda: bool(self._in.chunks) or self._in.closed)
            if not self._in.chunks:
                return b""
            chunk = self._in.chunks.popleft()
            self._in.buffered -= len(chunk)
            self._in.changed.notify_all()
            return chunk

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            async with self._out.changed:
                await self._out.changed.wait_for(
                    lambda: self._out.closed or self._out.buffered < self._out.window
                )
                if self._out.closed:
                    raise ConnectionError("stream is closed")
                room = self._out.window - self._out.buffered
                chunk, view = bytes(view[:room]), view[room:]
                self._out.chunks.append(chunk)
                self._out.buffered += len(chunk)
                self._out.changed.notify_all()

    async def close(self) -> None:
        for direction in (self._in, self._out):
            async with direction.changed:
                direction.closed = True
                direction.changed.notify_all()


def memory_stream_pair(
    window_bytes: int = DEFAULT_WINDOW_BYTES,
) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Return two connected ends; each buffers at most ``window_bytes`` per direction."""
    a_to_b, b_to_a = _Direction(window_bytes), _Direction(window_bytes)
    return MemoryByteStream(b_to_a, a_to_b), MemoryByteStream(a_to_b, b_to_a)
