"""``ws-dedicated``: the kit's transport suite over real local WebSockets, and its own promises.

A small websockets server stands in for the control plane's stream route: it accepts a dial
at ``/api/v1/agents/vnc/<token>`` for a token it is waiting for, and hands the accepted
socket to the test as the viewer-facing end.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path

import pytest
import pytest_asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamspace_sdk import drivers
from streamspace_sdk.errors import ProtocolError, StreamRefused
from streamspace_sdk.protocol import MAX_BINARY_PAYLOAD_BYTES, Frame, VncOpen
from streamspace_sdk.testing import StreamPairFactory, TransportConformance
from streamspace_sdk.transport import ByteStream, Transport
from streamspace_sdk.transports import DedicatedStream, DedicatedTransport, stream_url

PREFIX = "/api/v1/agents/vnc/"


class _ServerEnd(ByteStream):
    """The control plane's end of a dedicated socket, as the test sees it."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def read(self) -> bytes:
        try:
            message = await self.ws.recv()
        except ConnectionClosed:
            return b""
        assert isinstance(message, bytes)
        return message

    async def write(self, data: bytes) -> None:
        try:  # split at the cap, as the control plane does: the agent takes no larger
            for i in range(0, len(data), MAX_BINARY_PAYLOAD_BYTES):
                await self.ws.send(data[i : i + MAX_BINARY_PAYLOAD_BYTES])
        except ConnectionClosed as exc:
            raise ConnectionError("closed") from exc

    async def close(self) -> None:
        await self.ws.close()


class _Link:
    def __init__(self, url: str) -> None:
        self.url = url

    async def send(self, frame: Frame) -> None:
        raise AssertionError(f"ws-dedicated sent {frame.type} on the agent socket")

    async def send_binary(self, data: bytes) -> None:
        raise AssertionError("ws-dedicated sent bytes on the agent socket")


class _FakeRoute:
    """Accepts dials for tokens it waits for; refuses the rest with HTTP 403."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[_ServerEnd]] = {}
        self.link = _Link("")
        self.transport = DedicatedTransport()
        self._next = 0

    def check(self, conn: ServerConnection, request: Request) -> Response | None:
        token = request.path.removeprefix(PREFIX)
        if not request.path.startswith(PREFIX) or token not in self.waiting:
            return conn.respond(HTTPStatus.FORBIDDEN, "unknown stream token\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.waiting.pop(ws.request.path.removeprefix(PREFIX)).set_result(_ServerEnd(ws))
        await ws.wait_closed()

    def request(self, token: str | None = None) -> VncOpen:
        self._next += 1
        token = token or secrets.token_urlsafe(32)
        self.waiting[token] = asyncio.get_running_loop().create_future()
        return VncOpen(
            stream_id=self._next, session_id="s-1", transport="ws-dedicated", stream_token=token
        )

    async def open(self) -> tuple[ByteStream, ByteStream]:
        request = self.request()
        assert request.stream_token is not None
        waiting = self.waiting[request.stream_token]
        agent_end = await self.transport.open_stream(self.link, request)
        return agent_end, await waiting


@pytest_asyncio.fixture
async def route() -> AsyncIterator[_FakeRoute]:
    made = _FakeRoute()
    async with serve(
        made.handler, "127.0.0.1", 0, process_request=made.check, compression=None, close_timeout=1
    ) as server:
        port = server.sockets[0].getsockname()[1]
        made.link = _Link(f"ws://127.0.0.1:{port}/api/v1/agents/connect")
        yield made
        server.close(close_connections=True)


def _kernel_buffer_max() -> int:
    """Most bytes the kernel may hold for one loopback connection: send plus receive."""
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    return wmem + rmem


class TestDedicatedTransport(TransportConformance):
    """The kit's suite: each stream its own WebSocket on 127.0.0.1."""

    @pytest.fixture
    def transport_pair(self, route: _FakeRoute) -> StreamPairFactory:
        return route.open

    @pytest.fixture
    def max_buffered_bytes(self) -> int:
        """The socket is the flow control: the kernel's buffers (their sysctl maximums),
        plus the library queues of both ends (a few frames of the payload cap)."""
        return _kernel_buffer_max() + 32 * MAX_BINARY_PAYLOAD_BYTES


def test_ws_dedicated_is_a_registered_transport() -> None:
    transport = drivers.load_driver(drivers.TRANSPORTS, "ws-dedicated", base=Transport)
    assert isinstance(transport, DedicatedTransport)
    assert "dedicated" in transport.capabilities


@pytest.mark.parametrize(
    ("agent_url", "expected"),
    [
        ("ws://cp:8080/api/v1/agents/connect", "ws://cp:8080/api/v1/agents/vnc/t0k"),
        ("wss://cp.example.com/agent/ws", "wss://cp.example.com/api/v1/agents/vnc/t0k"),
        ("wss://cp.example.com/api/v1/agents/hub", "wss://cp.example.com/api/v1/agents/vnc/t0k"),
        ("wss://h/prefix/api/v1/agents/connect/", "wss://h/prefix/api/v1/agents/vnc/t0k"),
        ("ws://h/api/v1/agents/connect?x=1#f", "ws://h/api/v1/agents/vnc/t0k"),
    ],
)
def test_stream_url_sits_beside_the_agent_endpoint(agent_url: str, expected: str) -> None:
    assert stream_url(agent_url, "t0k") == expected


def test_stream_url_quotes_the_token() -> None:
    assert stream_url("ws://h/api/v1/agents/connect", "a/b?c").endswith("/vnc/a%2Fb%3Fc")


@pytest.mark.asyncio
async def test_a_refused_dial_is_stream_refused_naming_the_status(route: _FakeRoute) -> None:
    request = route.request()
    bad = request.model_copy(update={"stream_token": "not-the-token"})
    with pytest.raises(StreamRefused, match="HTTP 403"):
        await route.transport.open_stream(route.link, bad)


@pytest.mark.asyncio
async def test_an_unreachable_control_plane_is_stream_refused(route: _FakeRoute) -> None:
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        link = _Link(f"ws://127.0.0.1:{port}/api/v1/agents/connect")
        with pytest.raises(StreamRefused, match="cannot dial"):
            await route.transport.open_stream(link, route.request())


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("update", "match"),
    [({"transport": "ws-mux"}, "not 'ws-dedicated'"), ({"stream_token": None}, "stream_token")],
)
async def test_a_request_it_cannot_serve_is_a_protocol_error(
    route: _FakeRoute, update: dict[str, object], match: str
) -> None:
    request = route.request().model_copy(update=update)
    with pytest.raises(ProtocolError, match=match):
        await route.transport.open_stream(route.link, request)


@pytest.mark.asyncio
async def test_large_writes_are_split_at_the_payload_cap(route: _FakeRoute) -> None:
    agent, viewer = await route.open()
    payload = b"y" * (2 * MAX_BINARY_PAYLOAD_BYTES + 5)
    await agent.write(payload)
    sizes = [len(await viewer.read()) for _ in range(3)]
    assert sizes == [MAX_BINARY_PAYLOAD_BYTES, MAX_BINARY_PAYLOAD_BYTES, 5]
    await agent.close()
    await viewer.close()


@pytest.mark.asyncio
async def test_a_text_message_ends_the_stream(route: _FakeRoute) -> None:
    agent, viewer = await route.open()
    assert isinstance(agent, DedicatedStream)
    assert isinstance(viewer, _ServerEnd)
    await viewer.ws.send("not bytes")
    assert await asyncio.wait_for(agent.read(), 10) == b""
    assert agent.closed
    with pytest.raises(ConnectionError):
        await agent.write(b"x")
    await viewer.close()
