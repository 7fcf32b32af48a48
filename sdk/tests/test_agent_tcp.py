"""The agent's VNC-server connection, on asyncio's loop and on uvloop (what ``Agent.run``
uses where it is installed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from streamspace_sdk.agent import event_loop_factory
from streamspace_sdk.agent._tcp import HIGH_WATER_BYTES, VncConnection, open_vnc_connection
from streamspace_sdk.protocol import MAX_BINARY_PAYLOAD_BYTES

LOOPS = {"asyncio": None, "uvloop": event_loop_factory()}


def run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if LOOPS[loop] is None and loop == "uvloop":
        pytest.fail("uvloop is a dependency of the sdk on this platform, but is not importable")
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


async def _server(payload: bytes, got: bytearray, done: asyncio.Event) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.extend(await reader.readexactly(5))
        writer.write(payload)
        await writer.drain()
        await done.wait()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_reads_everything_in_capped_chunks_then_the_end(loop: str) -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB

    async def main() -> None:
        got, done = bytearray(), asyncio.Event()
        server = await _server(payload, got, done)
        conn = await open_vnc_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await conn.write(b"hello")
        received = bytearray()
        while len(received) < len(payload):
            chunk = await conn.read()
            assert 0 < len(chunk) <= MAX_BINARY_PAYLOAD_BYTES
            received += chunk
        done.set()
        assert await asyncio.wait_for(conn.read(), 10) == b""
        assert bytes(received) == payload
        assert got == b"hello"
        await conn.close()
        with pytest.raises(ConnectionError):
            await conn.write(b"late")
        server.close()
        await server.wait_closed()

    run(loop, main)


def _paused(conn: VncConnection) -> bool:
    return conn._paused


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_reader_that_stops_pauses_the_socket(loop: str) -> None:
    """Unread bytes stop at the high-water mark plus one read: the server is held back."""
    payload = b"\0" * (32 * HIGH_WATER_BYTES)

    async def main() -> None:
        got, done = bytearray(), asyncio.Event()
        server = await _server(payload, got, done)
        conn = await open_vnc_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert isinstance(conn, VncConnection)
        await conn.write(b"hello")
        total = len(await conn.read())
        async with asyncio.timeout(10):  # woken by every chunk the loop delivers
            while not _paused(conn):
                conn._readable.clear()
                await conn._readable.wait()
        held = conn._buffered
        assert held <= HIGH_WATER_BYTES + 256 * 1024  # the mark plus one read of the loop
        await asyncio.sleep(0.05)
        assert conn._buffered == held  # paused: nothing more is read
        while total < len(payload):  # reading again resumes the socket
            total += len(await conn.read())
        assert not _paused(conn)
        done.set()
        await conn.close()
        server.close()
        await server.wait_closed()

    run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_server_that_stops_reading_fails_the_write_and_close_does_not_wait(loop: str) -> None:
    """A write the server takes nothing of fails after ``stall_timeout_s``; close then
    drops the unsent bytes instead of waiting for them."""

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # and never read

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await open_vnc_connection("127.0.0.1", port, stall_timeout_s=0.3)
        chunk = b"\0" * (1024 * 1024)

        async def flood() -> None:
            while True:
                await conn.write(chunk)

        async with asyncio.timeout(10):
            with pytest.raises(ConnectionError, match="did not take the bytes"):
                await flood()
            await conn.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    run(loop, main)
