"""TcpBalancer: forwards to the first backend that accepts, rotates, and cuts on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from streamspace_sdk.testing import Faults, TcpBalancer


@contextlib.asynccontextmanager
async def echo_server(tag: bytes) -> AsyncIterator[tuple[str, int]]:
    """A server that answers ``tag`` then echoes until EOF, then closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(tag)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def closed_port() -> tuple[str, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "127.0.0.1", sock.getsockname()[1]


async def first_bytes(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await reader.readexactly(1)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_first_policy_skips_a_backend_that_refuses_and_passes_bytes_and_eof() -> None:
    dead = closed_port()
    async with echo_server(b"a") as a, TcpBalancer([dead, a]) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await reader.readexactly(1) == b"a"
        payload = bytes(range(256)) * 4096
        writer.write(payload)
        writer.write_eof()
        assert await reader.read() == payload  # echoed whole, then the server's EOF
        writer.close()
        assert lb.accepted == {a: 1}


@pytest.mark.asyncio
async def test_round_robin_rotates_over_backends() -> None:
    async with (
        echo_server(b"a") as a,
        echo_server(b"b") as b,
        TcpBalancer([a, b], policy="round-robin") as lb,
    ):
        seen = [await first_bytes(lb.port) for _ in range(4)]
    assert seen == [b"a", b"b", b"a", b"b"]


@pytest.mark.asyncio
async def test_cut_resets_open_connections_and_new_ones_still_pass() -> None:
    async with echo_server(b"a") as a, TcpBalancer([a]) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await reader.readexactly(1) == b"a"
        assert lb.connections == 1
        assert lb.cut() == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()
        assert await first_bytes(lb.port) == b"a"


@pytest.mark.asyncio
async def test_no_backend_closes_the_client_and_bad_policy_is_refused() -> None:
    async with TcpBalancer([closed_port()]) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await reader.read() == b""
        writer.close()
    with pytest.raises(ValueError, match="round-robin"):
        TcpBalancer([], policy="random")  # type: ignore[arg-type]


async def echo_round(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` through an echo server at ``port``; return what came back and the
    seconds it took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await reader.readexactly(1) == b"a"
        t0 = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        back = await reader.readexactly(len(payload))
        return back, time.perf_counter() - t0
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_latency_bandwidth_and_slicing_delay_bytes_but_keep_them_intact() -> None:
    payload = bytes(range(256)) * 256  # 64 KiB
    async with echo_server(b"a") as a, TcpBalancer([a]) as lb:
        lb.faults = Faults(latency_s=0.05)
        back, took = await echo_round(lb.port, b"x")
        assert back == b"x"
        assert took >= 0.1  # there and back
        lb.faults = Faults(bytes_per_s=512 * 1024, slice_bytes=1000)
        back, took = await echo_round(lb.port, payload)
        assert back == payload
        assert took >= len(payload) / (512 * 1024) * 0.9  # the two ways overlap


@pytest.mark.asyncio
async def test_a_black_hole_swallows_bytes_silently_until_it_clears() -> None:
    async with echo_server(b"a") as a, TcpBalancer([a]) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await reader.readexactly(1) == b"a"
        lb.faults.black_hole = True
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):  # nothing comes back, and nothing closes
            await asyncio.wait_for(reader.read(1), 0.3)
        lb.faults.black_hole = False
        writer.write(b"found")
        await writer.drain()
        assert await reader.readexactly(5) == b"found"
        writer.close()


@pytest.mark.asyncio
async def test_reset_after_bytes_cuts_a_connection_mid_stream() -> None:
    async with echo_server(b"a") as a, TcpBalancer([a]) as lb:
        lb.faults.reset_after_bytes = 1000
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await reader.readexactly(1) == b"a"
        writer.write(b"z" * 5000)
        got = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                got += chunk
        assert len(got) < 1000  # the echo of what passed, never all of it
        writer.close()
