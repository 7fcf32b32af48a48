"""A TCP forwarder for tests: a Service in front of several backends, and a bad network.

:class:`TcpBalancer` listens on 127.0.0.1 and forwards each connection to a backend, as a
Kubernetes Service forwards to its pods: ``first`` sends every connection to the first
backend that accepts (a preferred replica, then the others when it is gone), and
``round-robin`` rotates the first choice. A backend that refuses is skipped, so a client
whose replica died reconnects to a live one.

Faults: :meth:`TcpBalancer.cut` resets every open connection, as a crashed node would, and
:attr:`TcpBalancer.faults` (:class:`Faults`, changeable at any time) delays, slows, slices
or swallows the bytes in flight, or resets a connection after so many bytes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Faults", "TcpBalancer"]

_CHUNK = 256 * 1024


@dataclass
class Faults:
    """What the network does to the bytes it carries, both ways (all off by default)."""

    latency_s: float = 0.0
    """Delay before each chunk is passed on."""
    bytes_per_s: float | None = None
    """Bandwidth cap per direction of each connection."""
    slice_bytes: int | None = None
    """Pass data on in pieces of at most this many bytes (each written on its own)."""
    black_hole: bool = False
    """Swallow everything, closing nothing: a peer that vanished without a reset."""
    reset_after_bytes: int | None = None
    """Reset a connection once this many bytes have passed one way."""


class TcpBalancer:
    """Forward connections on ``127.0.0.1:port`` to ``backends`` (``(host, port)`` pairs).

    Use as ``async with TcpBalancer([...]) as lb:``; :attr:`port` is then bound.

    Args:
        backends: Where to forward, in order of preference.
        policy: ``first`` (the first that accepts) or ``round-robin``.
        connect_timeout_s: How long one backend may take to accept before the next is tried.
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        *,
        policy: Literal["first", "round-robin"] = "first",
        connect_timeout_s: float = 2.0,
    ) -> None:
        if policy not in ("first", "round-robin"):
            raise ValueError(f"policy must be 'first' or 'round-robin', not {policy!r}")
        self.backends = list(backends)
        """Where connections go; may be changed while it runs."""
        self.policy = policy
        self.connect_timeout_s = connect_timeout_s
        self.accepted: dict[tuple[str, int], int] = {}
        """How many connections each backend accepted."""
        self.faults = Faults()
        """What happens to the bytes; change it while connections are open."""
        self._turn = itertools.count()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port it listens on."""
        if self._server is None:
            raise RuntimeError("TcpBalancer is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """How many connections are open now, each a client and its backend.

        One ends once both ways have reached end of file (or either failed), so when it
        drops the backend has closed its side too.
        """
        return len(self._links)

    async def __aenter__(self) -> TcpBalancer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._links:
            await asyncio.gather(*self._links, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> int:
        """Reset every open connection, both sides; return how many were open."""
        links = len(self._links)
        for writer in list(self._writers):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        return links

    async def _pipe_both(
        self,
        a_reader: asyncio.StreamReader,
        a_writer: asyncio.StreamWriter,
        b_reader: asyncio.StreamReader,
        b_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until both ends have finished, or until either fails."""
        pending = {
            asyncio.create_task(self._pipe(a_reader, b_writer, a_writer)),
            asyncio.create_task(self._pipe(b_reader, a_writer, b_writer)),
        }
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not all(task.result() for task in done):
                    return  # a reset: the other way cannot go on either
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source: asyncio.StreamWriter,
    ) -> bool:
        """Copy until end of file and pass the EOF on; False if either side failed or a
        fault reset the connection."""
        passed = 0
        try:
            while data := await reader.read(_CHUNK):
                faults = self.faults
                if faults.black_hole:
                    continue
                if faults.latency_s:
                    await asyncio.sleep(faults.latency_s)
                limit = faults.reset_after_bytes
                if limit is not None and passed + len(data) >= limit:
                    writer.write(data[: max(0, limit - passed)])
                    source.transport.abort()
                    writer.transport.abort()
                    return False
                step = faults.slice_bytes or len(data)
                for start in range(0, len(data), step):
                    piece = data[start : start + step]
                    writer.write(piece)
                    await writer.drain()
                    if faults.bytes_per_s:
                        await asyncio.sleep(len(piece) / faults.bytes_per_s)
                passed += len(data)
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):  # uvloop raises RuntimeError on a reset transport
            return False
        return True

    def _order(self) -> list[tuple[str, int]]:
        backends = list(self.backends)
        if self.policy == "round-robin" and backends:
            start = next(self._turn) % len(backends)
            backends = backends[start:] + backends[:start]
        return backends

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self._writers.add(writer)
        try:
            for backend in self._order():
                try:
                    async with asyncio.timeout(self.connect_timeout_s):
                        up_reader, up_writer = await asyncio.open_connection(*backend)
                except (OSError, TimeoutError):
                    continue
                self.accepted[backend] = self.accepted.get(backend, 0) + 1
                self._writers.add(up_writer)
                try:
                    await self._pipe_both(reader, writer, up_reader, up_writer)
                finally:
                    self._writers.discard(up_writer)
                    _close(up_writer)
                return
        finally:
            self._writers.discard(writer)
            _close(writer)
            self._links.discard(task)


def _close(writer: asyncio.StreamWriter) -> None:
    if not writer.transport.is_closing():
        writer.close()
