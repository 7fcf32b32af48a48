"""``TransportConformance``: what every VNC transport must do with bytes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from streamspace_sdk.testing.base import BaseConformance
from streamspace_sdk.transport import DEFAULT_WINDOW_BYTES, ByteStream

__all__ = ["StreamPairFactory", "TransportConformance"]

StreamPairFactory = Callable[[], Awaitable[tuple[ByteStream, ByteStream]]]
"""Opens one stream and returns ``(agent_end, viewer_end)``."""


async def _read_exactly(stream: ByteStream, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.read()
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class TransportConformance(BaseConformance):
    """Tests for a VNC transport. Subclass it and provide ``transport_pair``.

    ``transport_pair`` is an async callable that opens a new stream through the transport
    and returns its two ends, ``(agent_end, viewer_end)``. Override ``max_buffered_bytes``
    with the most a stalled reader may make the transport hold.
    """

    stall_wait_s: float = 0.5
    """Real time given to a writer facing a stalled reader before its progress is counted."""

    @pytest.fixture
    def transport_pair(self) -> StreamPairFactory:
        """Return the stream opener under test. Required: override it in your test class."""
        pytest.fail("TransportConformance needs a `transport_pair` fixture")

    @pytest.fixture
    def max_buffered_bytes(self) -> int:
        """Most bytes in flight with a stalled reader: a window each way plus socket slack."""
        return 4 * DEFAULT_WINDOW_BYTES

    @pytest.mark.asyncio
    async def test_large_payload_intact_both_ways(self, transport_pair: StreamPairFactory) -> None:
        """Contract: 4 MiB of random bytes arrive intact and in order in each direction.

        Troubleshooting: split large writes into frames no bigger than the window and keep
        them in order per stream.
        """
        agent, viewer = await transport_pair()
        rng = random.Random(7)
        for src, dst in ((agent, viewer), (viewer, agent)):
            payload = rng.randbytes(4 * 1024 * 1024)
            writer = asyncio.ensure_future(src.write(payload))
            received = await _read_exactly(dst, len(payload))
            await writer
            assert received == payload
        await agent.close()
        await viewer.close()

    @pytest.mark.asyncio
    async def test_many_small_writes_in_order(self, transport_pair: StreamPairFactory) -> None:
        """Contract: 2,000 small writes arrive as the same bytes, in order.

        Troubleshooting: do not reorder or coalesce frames across streams.
        """
        agent, viewer = await transport_pair()
        pieces = [i.to_bytes(4, "big") + b"x" * (i % 17) for i in range(2000)]
        expected = b"".join(pieces)

        async def send() -> None:
            for piece in pieces:
                await agent.write(piece)

        sender = asyncio.ensure_future(send())
        received = await _read_exactly(viewer, len(expected))
        await sender
        assert received == expected
        await agent.close()
        await viewer.close()

    @pytest.mark.asyncio
    async def test_close_propagates(self, transport_pair: StreamPairFactory) -> None:
        """Contract: closing either end makes the other end's read return ``b""``.

        Troubleshooting: send a close for the stream on ``close()`` and end reads on receipt.
        """
        for closer in (0, 1):
            ends = await transport_pair()
            await ends[closer].close()
            other = ends[1 - closer]
            assert await asyncio.wait_for(_read_exactly(other, 1), 10) == b""
            await other.close()

    @pytest.mark.asyncio
    async def test_stalled_reader_bounds_the_buffer(
        self, transport_pair: StreamPairFactory, max_buffered_bytes: int
    ) -> None:
        """Contract: when the reader stops reading, the writer stops within a bounded buffer.

        Troubleshooting: ``write`` must wait for credit from the reader once a window of
        bytes is in flight; never queue without bound.
        """
        agent, viewer = await transport_pair()
        written = 0
        chunk = b"\0" * 16384

        async def flood() -> None:
            nonlocal written
            while written < 64 * max_buffered_bytes:
                await agent.write(chunk)
                written += len(chunk)

        task = asyncio.ensure_future(flood())
        done, _ = await asyncio.wait({task}, timeout=self.stall_wait_s)
        assert not done, "the writer finished although nobody was reading"
        assert written <= max_buffered_bytes, f"{written} bytes went out to a stalled reader"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()
        await viewer.close()

    @pytest.mark.asyncio
    async def test_concurrent_streams_stay_separate(
        self, transport_pair: StreamPairFactory
    ) -> None:
        """Contract: 20 streams at once each carry only their own bytes.

        Troubleshooting: key every frame and credit by stream id.
        """
        pairs = [await transport_pair() for _ in range(20)]
        payloads = [bytes([i]) * (50_000 + i) for i in range(len(pairs))]

        async def one(i: int) -> bytes:
            agent, viewer = pairs[i]
            sender = asyncio.ensure_future(agent.write(payloads[i]))
            got = await _read_exactly(viewer, len(payloads[i]))
            await sender
            return got

        results = await asyncio.gather(*(one(i) for i in range(len(pairs))))
        assert results == payloads
        for agent, viewer in pairs:
            await agent.close()
            await viewer.close()
