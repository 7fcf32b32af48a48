"""Moving VNC bytes: between an accepted WebSocket and a stream, and to another replica.

:func:`relay` pumps both ways until one side ends or the stream idles; it never looks
inside the bytes. :func:`dial_replica` opens this replica's end of an internal WebSocket
to another replica (``http://`` base URLs become ``ws://``), as a :class:`ReplicaStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from streamspace_sdk.protocol import MAX_BINARY_PAYLOAD_BYTES
from streamspace_sdk.transport import ByteStream
from streamspace_sdk.transports.dedicated import DedicatedStream

__all__ = [
    "CLOSE_IDLE",
    "CLOSE_NORMAL",
    "CLOSE_UNAVAILABLE",
    "CLOSE_UNSUPPORTED",
    "ReplicaRefused",
    "ReplicaStream",
    "Traffic",
    "close_websocket",
    "dial_replica",
    "relay",
    "relay_to_replica",
]

logger = logging.getLogger("streamspace.controlplane.vnc")

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003
CLOSE_UNAVAILABLE = 1011
CLOSE_IDLE = 4408

_QUEUE_MESSAGES = 16
"""Messages a replica's end of an internal socket queues before it stops reading: with the
frame size cap, at most 4 MiB held for a stalled viewer."""


@dataclass
class Traffic:
    """The bytes one relay moved, for its closing log line."""

    to_stream: int = 0
    """Bytes from the WebSocket to the stream (viewer to session)."""
    to_websocket: int = 0
    """Bytes from the stream to the WebSocket (session to viewer)."""


class ReplicaRefused(Exception):
    """The other replica refused the internal socket (``status``, as HTTP) or is away."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ReplicaStream(DedicatedStream):
    """This replica's end of an internal WebSocket to another; keeps the peer's close."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(ws)
        self._conn = ws
        self.close_code: int | None = None
        """The other replica's close code, once it closed."""

    async def read(self) -> bytes:
        chunk = await super().read()
        if not chunk:
            self.close_code = self._conn.close_code
            self.close_reason = self._conn.close_reason or ""
        return chunk


async def dial_replica(
    base_url: str, path: str, headers: dict[str, str], *, timeout_s: float
) -> ReplicaStream:
    """Open an internal WebSocket to ``base_url`` + ``path``.

    Raises:
        ReplicaRefused: it answered with an HTTP status instead (that status), or could not
            be reached in ``timeout_s`` (503).
    """
    url = "ws" + base_url.removeprefix("http") + path
    try:
        ws = await connect(
            url,
            additional_headers=headers,
            compression=None,  # VNC data is already compressed
            open_timeout=timeout_s,
            close_timeout=2.0,
            max_size=MAX_BINARY_PAYLOAD_BYTES,
            max_queue=_QUEUE_MESSAGES,
            ping_interval=None,  # ends with the viewer's socket, which has its own watchdog
        )
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace") if exc.response.body else ""
        raise ReplicaRefused(exc.response.status_code, _message(body)) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise ReplicaRefused(
            503, f"the replica at {base_url} cannot be reached: {exc or type(exc).__name__}"
        ) from None
    return ReplicaStream(ws)


def _message(body: str) -> str:
    """The ``error.message`` of an API error body, else the body itself (shortened)."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return str(json.loads(body)["error"]["message"])
    return body[:200] or "refused"


async def close_websocket(websocket: WebSocket, code: int, reason: str) -> None:
    """Close an accepted socket, ignoring one already gone."""
    with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError):
        await websocket.close(code, reason[:120])


async def relay(
    websocket: WebSocket,
    stream: ByteStream,
    *,
    idle_timeout_s: float,
    to_stream: Counter | None = None,
    to_websocket: Counter | None = None,
    revoked: tuple[asyncio.Event, Callable[[], tuple[int, str]]] | None = None,
    traffic: Traffic | None = None,
) -> tuple[int, str]:
    """Pump bytes both ways until one side ends or both idle ``idle_timeout_s``; return
    the close code and reason for ``websocket``. ``to_*`` and ``traffic`` count the bytes
    moved; when the event of ``revoked`` is set, the relay ends with the close its function
    returns."""
    loop = asyncio.get_running_loop()
    moved = traffic if traffic is not None else Traffic()
    last = loop.time()  # of the latest byte either way; the watchdog reads it

    async def from_websocket() -> tuple[int, str]:
        nonlocal last
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return CLOSE_NORMAL, ""
            data = message.get("bytes")
            if data is None:
                return CLOSE_UNSUPPORTED, "VNC data must be sent in binary frames"
            last = loop.time()
            try:
                await stream.write(data)
            except ConnectionError:
                return CLOSE_NORMAL, _why(stream)
            moved.to_stream += len(data)
            if to_stream is not None:
                to_stream.inc(len(data))

    async def from_stream() -> tuple[int, str]:
        nonlocal last
        while chunk := await stream.read():
            last = loop.time()
            try:
                await websocket.send_bytes(chunk)
            except (WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError):
                return CLOSE_NORMAL, ""
            moved.to_websocket += len(chunk)
            if to_websocket is not None:
                to_websocket.inc(len(chunk))
        return CLOSE_NORMAL, _why(stream)

    async def watchdog() -> tuple[int, str]:
        # A deadline, not an event per message: it wakes once per timeout period, so a
        # busy stream costs it nothing.
        while True:
            idle = loop.time() - last
            if idle >= idle_timeout_s:
                return CLOSE_IDLE, f"idle for {idle_timeout_s:g}s"
            await asyncio.sleep(idle_timeout_s - idle)

    async def revocation() -> tuple[int, str]:
        assert revoked is not None
        await revoked[0].wait()
        return revoked[1]()

    tasks = [
        asyncio.create_task(from_websocket()),
        asyncio.create_task(from_stream()),
        asyncio.create_task(watchdog()),
    ]
    if revoked is not None:
        tasks.append(asyncio.create_task(revocation()))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = next(iter(done))
    failure = None if first.cancelled() else first.exception()
    if first.cancelled() or failure is not None:
        logger.warning("A VNC relay failed", exc_info=failure)
        return CLOSE_UNAVAILABLE, "the relay failed"
    code, reason = first.result()
    if isinstance(stream, ReplicaStream) and stream.close_code not in (None, CLOSE_NORMAL, 1005):
        code = stream.close_code  # the other replica's verdict, e.g. idle or unavailable
    return code, reason


async def relay_to_replica(
    websocket: WebSocket,
    stream: ReplicaStream,
    *,
    idle_timeout_s: float,
    gauge: Gauge,
    subprotocol: str | None = None,
    traffic: Traffic | None = None,
) -> tuple[int, str]:
    """Accept ``websocket`` and pump it to the other replica until either side ends; the
    socket is counted in ``gauge`` meanwhile, its bytes in ``traffic``. Return the close
    code and reason it got."""
    await websocket.accept(subprotocol=subprotocol)
    gauge.inc()
    try:
        code, reason = await relay(
            websocket, stream, idle_timeout_s=idle_timeout_s, traffic=traffic
        )
    finally:
        gauge.dec()
        await stream.close()
    await close_websocket(websocket, code, reason)
    return code, reason


def _why(stream: ByteStream) -> str:
    return stream.close_reason or "the session's VNC server closed"
