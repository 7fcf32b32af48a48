"""The VNC path: ``POST /api/v1/sessions/{id}/vnc-token`` and the viewer socket ``/vnc/{id}``.

A viewer (noVNC, or any RFB client over WebSocket) first gets a token from the REST API,
then opens ``/vnc/{session_id}?token=...``. Before the socket is accepted, and before
anything reaches the agent, the ``Origin`` (when present) must be this host or one of
``ALLOWED_ORIGINS``, and the token must be valid, unused and for this session; anything
else is refused with HTTP 403. Then the socket is accepted (with subprotocol ``binary`` when
offered, as noVNC asks), a stream is opened to the agent holding the session through the
transport the agent uses (``ws-mux`` on its own socket, or ``ws-dedicated``, a socket it
dials for this viewer), and bytes are relayed unmodified both ways. Closing either side
closes the other; a stream idle for ``VNC_PROXY_TIMEOUT`` is closed. Each viewer gets its
own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.http import control_plane, deny_websocket, json_response, require_user
from streamspace_controlplane.openapi import Operation
from streamspace_controlplane.routes.agents import OFFERED_TRANSPORTS, AgentSocket
from streamspace_controlplane.routes.streams import dedicated_streams
from streamspace_controlplane.schemas import VncTokenOut
from streamspace_controlplane.services import vnc as vnc_service
from streamspace_sdk.errors import StreamRefused
from streamspace_sdk.transport import ByteStream
from streamspace_sdk.transports.mux import MuxTransport

__all__ = ["OPEN_TIMEOUT_S", "OPERATIONS", "SUBPROTOCOL", "VNC_PATH", "routes"]

logger = logging.getLogger("streamspace.controlplane.vnc")

VNC_PATH = "/vnc/{session_id}"
"""Where viewers connect."""
SUBPROTOCOL = "binary"
"""The WebSocket subprotocol noVNC asks for; chosen when offered."""
OPEN_TIMEOUT_S = 10.0
"""Seconds the agent may take to connect a stream to the session's VNC server."""

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_UNSUPPORTED = 1003
CLOSE_UNAVAILABLE = 1011
CLOSE_IDLE = 4408


async def create_vnc_token(request: Request) -> Response:
    """Issue a single-use token for a running session's VNC socket."""
    session_id = request.path_params["session_id"]
    actor = await require_user(request, "session.vnc", f"session/{session_id}")
    token, expires_at = await vnc_service.issue_token(control_plane(request), actor, session_id)
    out = VncTokenOut(token=token, expires_at=expires_at, url=f"/vnc/{session_id}?token={token}")
    return json_response(out, 201, {"Cache-Control": "no-store"})


OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/v1/sessions/{session_id}/vnc-token",
        create_vnc_token,
        "Issue a token for the session's VNC socket",
        response=VncTokenOut,
        status=201,
        errors=(409,),
        tag="sessions",
        description="Valid 60 seconds, for one connection to `/vnc/{session_id}?token=...` "
        "(WebSocket, subprotocol `binary`), by the session's owner or an admin. "
        "409 when the session is not running.",
    ),
]
"""The REST side of the VNC path (mounted with the API)."""


def routes() -> list[BaseRoute]:
    """Return the viewer WebSocket route."""
    return [WebSocketRoute(VNC_PATH, viewer_socket, name="vnc")]


def _origin_allowed(cp: ControlPlane, websocket: WebSocket) -> bool:
    """Absent (not a browser) or this host or listed in ``ALLOWED_ORIGINS``."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in {o.strip().rstrip("/").lower() for o in cp.settings.allowed_origins}:
        return True
    host = websocket.headers.get("host", "").lower()
    return bool(host) and urlsplit(origin).netloc == host


async def _refuse(websocket: WebSocket, exc: ApiError) -> None:
    """Refuse before accepting: the HTTP status where the server can send one, else 403."""
    logger.info("Refused a VNC viewer: %s", exc.message)
    await deny_websocket(websocket, exc, CLOSE_POLICY)


async def viewer_socket(websocket: WebSocket) -> None:
    """Serve one viewer: check, accept, open a stream to the agent, relay until either ends."""
    cp = cast(ControlPlane, websocket.app.state.cp)
    session_id = websocket.path_params["session_id"]
    if not _origin_allowed(cp, websocket):
        await _refuse(websocket, ApiError(403, "forbidden", "Origin not allowed"))
        return
    try:
        session = await vnc_service.redeem_token(
            cp, websocket.query_params.get("token"), session_id
        )
    except ApiError as exc:
        await _refuse(websocket, exc)
        return
    conn = cp.hub.local(session.agent_id or "")
    if not isinstance(conn, AgentSocket):
        await _refuse(
            websocket,
            ApiError(503, "unavailable", f"the agent of session {session_id} is not connected"),
        )
        return
    transport = conn.vnc_transport
    if transport is None:
        await _refuse(
            websocket,
            ApiError(
                503,
                "unavailable",
                f"the agent of session {session_id} uses VNC transports {conn.transports}; "
                f"this control plane offers {list(OFFERED_TRANSPORTS)}",
            ),
        )
        return
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    metrics = cp.metrics
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        stream: ByteStream
        if transport == MuxTransport.name:
            stream = await conn.mux.open(session_id, timeout_s=OPEN_TIMEOUT_S)
        else:
            stream = await dedicated_streams(cp).open(conn, session_id, timeout_s=OPEN_TIMEOUT_S)
    except StreamRefused as exc:
        logger.warning("VNC stream to session %s refused: %s", session_id, exc.reason)
        await _close(websocket, CLOSE_UNAVAILABLE, exc.reason)
        return
    metrics.vnc_stream_open.observe(loop.time() - started)
    viewers = metrics.vnc_viewers.labels(session_id)
    viewers.inc()
    try:
        code, reason = await _relay(cp, websocket, stream, session_id)
    finally:
        viewers.dec()
        await stream.close()
    await _close(websocket, code, reason)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError):
        await websocket.close(code, reason[:120])


async def _relay(
    cp: ControlPlane, websocket: WebSocket, stream: ByteStream, session_id: str
) -> tuple[int, str]:
    """Pump bytes both ways until one side ends or the stream idles; return the close."""
    timeout_s = cp.settings.vnc_proxy_timeout
    loop = asyncio.get_running_loop()
    last = loop.time()  # of the latest byte either way; the watchdog reads it
    to_session = cp.metrics.vnc_bytes.labels(session_id, "to_session")
    to_viewer = cp.metrics.vnc_bytes.labels(session_id, "to_viewer")

    async def from_viewer() -> tuple[int, str]:
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
            to_session.inc(len(data))

    async def from_session() -> tuple[int, str]:
        nonlocal last
        while chunk := await stream.read():
            last = loop.time()
            try:
                await websocket.send_bytes(chunk)
            except (WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError):
                return CLOSE_NORMAL, ""
            to_viewer.inc(len(chunk))
        return CLOSE_NORMAL, _why(stream)

    async def watchdog() -> tuple[int, str]:
        # A deadline, not an event per message: it wakes once per timeout period, so a
        # busy stream costs it nothing.
        while True:
            idle = loop.time() - last
            if idle >= timeout_s:
                return CLOSE_IDLE, f"idle for {timeout_s:g}s"
            await asyncio.sleep(timeout_s - idle)

    tasks = [
        asyncio.create_task(from_viewer()),
        asyncio.create_task(from_session()),
        asyncio.create_task(watchdog()),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = next(iter(done))
    failure = None if first.cancelled() else first.exception()
    if first.cancelled() or failure is not None:
        logger.warning("The VNC relay of session %s failed", session_id, exc_info=failure)
        return CLOSE_UNAVAILABLE, "the relay failed"
    return first.result()


def _why(stream: ByteStream) -> str:
    return stream.close_reason or "the session's VNC server closed"
