"""``ws-mux``: the kit's transport suite over a real local WebSocket, and its own promises."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from streamspace_sdk import drivers
from streamspace_sdk.errors import ProtocolError, StreamRefused
from streamspace_sdk.protocol import (
    MAX_BINARY_PAYLOAD_BYTES,
    Frame,
    VncClose,
    VncCredit,
    VncOpen,
    VncOpened,
    dump_frame,
    encode_data,
    parse_frame,
)
from streamspace_sdk.testing import StreamPairFactory, TransportConformance
from streamspace_sdk.transport import ByteStream, Transport
from streamspace_sdk.transports import MuxStream, MuxStreams, MuxTransport


class _Link:
    """One end of the socket as a :class:`~streamspace_sdk.transports.MuxLink`."""

    url = "ws://127.0.0.1"

    def __init__(self, ws: ServerConnection | ClientConnection) -> None:
        self.ws = ws

    async def send(self, frame: Frame) -> None:
        try:
            await self.ws.send(dump_frame(frame))
        except ConnectionClosed as exc:
            raise ConnectionError("closed") from exc

    async def send_binary(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            raise ConnectionError("closed") from exc


@dataclass
class _Pair:
    """A control-plane side and an agent side of one real WebSocket."""

    cp: MuxStreams
    agent: MuxStreams
    agent_link: _Link
    transport: MuxTransport
    accepted: asyncio.Queue[MuxStream] = field(default_factory=asyncio.Queue)
    refuse: str | None = None
    """When set, the agent refuses every ``vnc.open`` with this reason."""
    opens: int = 0

    async def open(self) -> tuple[ByteStream, ByteStream]:
        viewer_end = await self.cp.open("s-1", timeout_s=10)
        agent_end = await self.accepted.get()
        return agent_end, viewer_end


async def _pump(ws: ServerConnection | ClientConnection, mux: MuxStreams, pair: _Pair) -> None:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                await mux.receive_binary(message)
                continue
            frame = parse_frame(message)
            if isinstance(frame, VncOpen):
                pair.opens += 1
                if pair.refuse is not None:
                    await mux.refuse(frame.stream_id, pair.refuse)
                    continue
                stream = await pair.transport.open_stream(pair.agent_link, frame)
                assert isinstance(stream, MuxStream)
                pair.accepted.put_nowait(stream)
            elif isinstance(frame, VncOpened | VncClose | VncCredit):
                await mux.receive(frame)
    except ConnectionClosed:
        pass
    finally:
        mux.close_all("socket closed")


@contextlib.asynccontextmanager
async def _socket_pair() -> AsyncIterator[_Pair]:
    ready: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        ready.set_result(ws)
        await done.wait()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=2**20) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=2**20) as client:
            server_ws = await ready
            transport = MuxTransport()
            agent_link = _Link(client)
            pair = _Pair(
                cp=MuxStreams(_Link(server_ws)),
                agent=transport.streams(agent_link),
                agent_link=agent_link,
                transport=transport,
            )
            tasks = [
                asyncio.create_task(_pump(server_ws, pair.cp, pair)),
                asyncio.create_task(_pump(client, pair.agent, pair)),
            ]
            try:
                yield pair
            finally:
                done.set()
                await client.close()
                await asyncio.gather(*tasks)


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[_Pair]:
    async with _socket_pair() as made:
        yield made


class TestMuxTransport(TransportConformance):
    """The kit's suite: two MuxStreams over a real WebSocket on 127.0.0.1."""

    @pytest.fixture
    def transport_pair(self, pair: _Pair) -> StreamPairFactory:
        return pair.open


def test_ws_mux_is_the_registered_transport() -> None:
    transport = drivers.load_driver(drivers.TRANSPORTS, "ws-mux", base=Transport)
    assert isinstance(transport, MuxTransport)
    assert "multiplexed" in transport.capabilities


@pytest.mark.asyncio
async def test_refused_open_raises_with_the_agents_reason(pair: _Pair) -> None:
    pair.refuse = "session s-1 is not running"
    with pytest.raises(StreamRefused, match="not running"):
        await pair.cp.open("s-1", timeout_s=10)
    assert len(pair.cp) == 0


@pytest.mark.asyncio
async def test_unanswered_open_times_out_and_is_closed(pair: _Pair) -> None:
    lonely = MuxStreams(pair.cp.link)  # nobody routes frames to it
    with pytest.raises(StreamRefused, match="within"):
        await lonely.open("s-1", timeout_s=0.05)
    assert len(lonely) == 0


@pytest.mark.asyncio
async def test_opened_for_a_stream_nobody_opens_is_answered_with_close(pair: _Pair) -> None:
    stream = pair.agent.accept(VncOpen(stream_id=99, session_id="s-1"))
    await pair.agent.confirm(stream)  # the control plane never asked for stream 99
    assert await asyncio.wait_for(stream.read(), 10) == b""
    assert stream.closed
    assert stream.close_reason == "not opening"


@pytest.mark.asyncio
async def test_overrunning_the_window_closes_the_stream(pair: _Pair) -> None:
    agent, viewer = await pair.open()
    # Bypass the credit accounting: a peer that ignores flow control sends past the window.
    frame = encode_data(agent.stream_id, b"x" * MAX_BINARY_PAYLOAD_BYTES)  # type: ignore[attr-defined]
    for _ in range(pair.cp.window_bytes // MAX_BINARY_PAYLOAD_BYTES + 1):
        await pair.agent_link.send_binary(frame)
    assert await asyncio.wait_for(agent.read(), 10) == b""  # the viewer never read
    assert viewer.closed  # type: ignore[attr-defined]
    assert "flow control" in agent.close_reason


@pytest.mark.asyncio
async def test_losing_the_socket_ends_every_stream() -> None:
    async with _socket_pair() as made:
        streams = [await made.open() for _ in range(3)]
        await made.agent_link.ws.close()
        for agent, viewer in streams:
            assert await asyncio.wait_for(viewer.read(), 10) == b""
            assert await asyncio.wait_for(agent.read(), 10) == b""
            with pytest.raises(ConnectionError):
                await viewer.write(b"x")
        with pytest.raises(StreamRefused, match="closed"):
            await made.cp.open("s-1", timeout_s=10)


@pytest.mark.asyncio
async def test_duplicate_stream_id_and_malformed_frames_are_protocol_errors(pair: _Pair) -> None:
    pair.agent.accept(VncOpen(stream_id=5, session_id="s-1"))
    with pytest.raises(ProtocolError, match="already open"):
        pair.agent.accept(VncOpen(stream_id=5, session_id="s-1"))
    with pytest.raises(ProtocolError):
        await pair.agent.receive_binary(b"\x02\x00\x00\x00\x05x")
    await pair.agent.receive_binary(encode_data(77, b"stale"))  # unknown stream: dropped
