"""``GET /api/v1/sessions/{session_id}/events``: a session's events as Server-Sent Events.

The stream first replays the stored events (after ``Last-Event-ID`` when the client
resumes), then sends live ones as they happen. Each is::

    id: <event id>
    event: state
    data: {"id": ..., "session_id": ..., "state": ..., "previous_state": ..., ...}

A comment line goes out every :data:`KEEPALIVE_S` seconds so proxies keep the connection,
and the stream ends when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from streamspace_controlplane.http import ApiError, control_plane, parse_query, require_user
from streamspace_controlplane.models import SessionEventRecord
from streamspace_controlplane.openapi import Operation
from streamspace_controlplane.schemas import EventsQuery
from streamspace_controlplane.services import sessions

__all__ = ["KEEPALIVE_S", "OPERATIONS", "EventStreamResponse", "format_event"]

logger = logging.getLogger("streamspace.controlplane")

KEEPALIVE_S = 15.0
"""Seconds between keep-alive comments; below the 30-60 s idle timeouts of common proxies."""

RETRY_MS = 3000
"""How long a browser's ``EventSource`` waits before reconnecting, sent once per stream."""


def format_event(event: SessionEventRecord) -> bytes:
    """Return one event in the text/event-stream format."""
    return f"id: {event.id}\nevent: state\ndata: {event.model_dump_json()}\n\n".encode()


class EventStreamResponse(Response):
    """A ``text/event-stream`` response that stops as soon as the client disconnects.

    Unlike a plain streaming response it always watches for the disconnect, whatever ASGI
    version the server speaks, so an idle stream does not outlive its client until the
    next keep-alive.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: Callable[[], AsyncGenerator[bytes, None]]) -> None:
        # Not Response.__init__: it would declare an empty body's Content-Length.
        self.status_code = 200
        self.background = None
        self._chunks = chunks
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        producer = asyncio.ensure_future(self._produce(send))
        listener = asyncio.ensure_future(self._listen(receive))
        try:
            await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (producer, listener):
                task.cancel()
            for task in (producer, listener):
                with contextlib.suppress(asyncio.CancelledError, OSError, ClientDisconnect):
                    await task

    async def _produce(self, send: Send) -> None:
        # aclosing: a cancelled stream closes its generator now, which unsubscribes it.
        async with contextlib.aclosing(self._chunks()) as chunks:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _listen(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


def _last_event_id(request: Request) -> int:
    query = parse_query(request, EventsQuery)
    header = request.headers.get("last-event-id", "").strip()
    if not header:
        return query.last_event_id or 0
    if not (header.isascii() and header.isdigit() and len(header) <= 19):
        message = "must be the id of an event: a whole number of zero or more"
        raise ApiError(
            422,
            "validation_error",
            f"invalid request: header.Last-Event-ID: {message}",
            fields=[{"field": "header.Last-Event-ID", "message": message}],
        )
    return int(header)


async def session_events(request: Request) -> Response:
    """Stream a session's events (stored, then live) as Server-Sent Events."""
    session_id = request.path_params["session_id"]
    actor = await require_user(request, "session.events", f"session/{session_id}")
    after = _last_event_id(request)
    cp = control_plane(request)
    feed = await sessions.open_events(cp, actor, session_id, after)

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield f"retry: {RETRY_MS}\n\n".encode()
        async with feed:
            while True:
                event = await feed.next(KEEPALIVE_S)
                yield b": keep-alive\n\n" if event is None else format_event(event)

    return EventStreamResponse(chunks)


OPERATIONS = [
    Operation(
        "GET",
        "/api/v1/sessions/{session_id}/events",
        session_events,
        "Stream a session's state changes and progress (Server-Sent Events)",
        query=EventsQuery,
        media_type="text/event-stream",
        tag="sessions",
        headers=(("Last-Event-ID", "Resume after this event id (as browsers send it)."),),
        description=(
            "Stored events first, then live ones. Each event has `id:` (the event id), "
            "`event: state` and a JSON `data:` line holding the event; a `: keep-alive` "
            "comment goes out every 15 s."
        ),
    ),
]
"""The event stream route, as the OpenAPI document lists it."""
