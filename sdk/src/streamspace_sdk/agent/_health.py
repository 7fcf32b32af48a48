"""``/health`` and ``/ready``: a minimal HTTP/1.1 responder on ``asyncio.start_server``.

Probes send one small ``GET`` and read one answer, so the responder reads the request line
and headers (bounded in size and time), answers with a JSON body and closes the connection.
No HTTP library is needed for that, and the agent gains no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["HealthServer", "Readiness"]

logger = logging.getLogger("streamspace.agent")

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
"""Returns whether the agent is ready now, and the JSON body that says why (or why not)."""

_MAX_HEAD_BYTES = 8192
"""Largest request line or header line read; probes send a few hundred bytes."""
_READ_TIMEOUT_S = 5.0
"""Time a client has to send its request; a probe that is slower has failed anyway."""
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serve ``GET /health`` (200 while the process runs) and ``GET /ready``.

    ``/ready`` answers 200 when ``readiness()`` says so and 503 otherwise, each with the
    JSON body it returns. ``HEAD`` is answered like ``GET`` without a body.

    Args:
        host: address to listen on (``HEALTH_HOST``).
        port: port to listen on (``HEALTH_PORT``); 0 picks a free one.
        readiness: called at every ``/ready`` request.
    """

    def __init__(self, host: str, port: int, readiness: Readiness) -> None:
        self.host = host
        self.requested_port = port
        self._readiness = readiness
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int | None:
        """The port actually bound, once started."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start listening.

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=_MAX_HEAD_BYTES
        )

    async def close(self) -> None:
        """Stop listening and close the connections still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                request_line = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: nothing in them changes the answer
            status, body, head_only = self._answer(request_line)
            payload = json.dumps(body).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if head_only else head + payload)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass  # a slow, vanished or oversized client: nothing to answer
        except Exception:
            logger.exception("The health endpoint failed to answer")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, request_line: bytes) -> tuple[int, dict[str, Any], bool]:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise ValueError("not an HTTP request line")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/health", "/ready"):
            return 404, {"status": "not found", "paths": ["/health", "/ready"]}, method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, {"status": "method not allowed", "allowed": ["GET", "HEAD"]}, False
        if target == "/health":
            return 200, {"status": "healthy"}, method == "HEAD"
        ready, body = self._readiness()
        return (200 if ready else 503), body, method == "HEAD"
