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

With several replicas the viewer may land on one that does not hold the agent. That
replica asks the hub which one does and opens an internal WebSocket to it,
``/internal/v1/vnc/{session_id}``, presenting a single-use relay ticket instead of the
viewer's token (used up here); the holder serves it as it would a viewer, and the first
replica pumps the bytes between the two sockets, undecoded.

Each viewer served logs two INFO lines (logger ``streamspace.controlplane.vnc``), for
``kubectl logs -l component=control-plane | grep vnc`` (or ``grep vnc_proxy``), as the seed
guide has operators run: ``VNC proxy connection established for session <id> (vnc_proxy:
...)`` once the stream to the agent is open, saying the agent and transport (or, on a
replica that relays the viewer, which replica holds the agent), and ``VNC proxy connection
closed for session <id> after <s>s (vnc_proxy: <n> bytes to the session, <n> to the viewer;
close <code> ...)``. Neither names the viewer's token nor a ticket.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket

from streamspace_controlplane._errors import ERROR_CODES, ApiError
from streamspace_controlplane.auth import parse_bearer
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.http import control_plane, deny_websocket, json_response, require_user
from streamspace_controlplane.hub.base import HubUnavailable
from streamspace_controlplane.models import Session
from streamspace_controlplane.openapi import Operation
from streamspace_controlplane.routes._relay import (
    CLOSE_UNAVAILABLE,
    ReplicaRefused,
    Traffic,
    close_websocket,
    dial_replica,
    relay,
    relay_to_replica,
)
from streamspace_controlplane.routes.agents import OFFERED_TRANSPORTS, AgentSocket
from streamspace_controlplane.routes.streams import dedicated_streams
from streamspace_controlplane.schemas import VncTokenOut
from streamspace_controlplane.services import tunnels as tunnel_service
from streamspace_controlplane.services import vnc as vnc_service
from streamspace_sdk.errors import StreamRefused
from streamspace_sdk.redact import redact_url
from streamspace_sdk.transport import ByteStream
from streamspace_sdk.transports.mux import MuxTransport

__all__ = ["OPEN_TIMEOUT_S", "OPERATIONS", "RELAY_PATH", "SUBPROTOCOL", "VNC_PATH", "routes"]

logger = logging.getLogger("streamspace.controlplane.vnc")

VNC_PATH = "/vnc/{session_id}"
"""Where viewers connect."""
RELAY_PATH = "/internal/v1/vnc/{session_id}"
"""Where a replica relays a viewer to the replica holding the session's agent."""
SUBPROTOCOL = "binary"
"""The WebSocket subprotocol noVNC asks for; chosen when offered."""
OPEN_TIMEOUT_S = 10.0
"""Seconds the agent may take to connect a stream to the session's VNC server."""

CLOSE_POLICY = 1008


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
    """Return the viewer WebSocket route and the replicas' internal one."""
    return [
        WebSocketRoute(VNC_PATH, viewer_socket, name="vnc"),
        WebSocketRoute(RELAY_PATH, replica_socket, name="vnc-relay"),
    ]


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
        session, grant = await vnc_service.redeem_token(
            cp, websocket.query_params.get("token"), session_id
        )
    except ApiError as exc:
        await _refuse(websocket, exc)
        return
    await _serve(cp, websocket, session, grant.username, relayed=False)


async def replica_socket(websocket: WebSocket) -> None:
    """Serve a viewer another replica relays here, on a relay ticket."""
    cp = cast(ControlPlane, websocket.app.state.cp)
    session_id = websocket.path_params["session_id"]
    try:
        ticket = parse_bearer(websocket.headers.get("authorization"))
        session, grant = await vnc_service.redeem_relay_ticket(cp, ticket, session_id)
    except ApiError as exc:
        await _refuse(websocket, exc)
        return
    await _serve(cp, websocket, session, grant.username, relayed=True)


async def _serve(
    cp: ControlPlane, websocket: WebSocket, session: Session, username: str, *, relayed: bool
) -> None:
    """Serve the viewer from this replica's agent socket, or relay it to the holder."""
    conn = cp.hub.local(session.agent_id or "")
    if conn is None and not relayed:
        try:
            replica = await cp.hub.locate(session.agent_id or "")
        except HubUnavailable as exc:
            await _refuse(websocket, ApiError(503, "unavailable", str(exc)))
            return
        if replica is not None and replica.pod != cp.hub.pod:
            await _forward(cp, websocket, session, username, replica.pod, replica.url)
            return
    if not isinstance(conn, AgentSocket):
        await _refuse(
            websocket,
            ApiError(503, "unavailable", f"the agent of session {session.id} is not connected"),
        )
        return
    transport = conn.vnc_transport
    if transport is None:
        await _refuse(
            websocket,
            ApiError(
                503,
                "unavailable",
                f"the agent of session {session.id} uses VNC transports {conn.transports}; "
                f"this control plane offers {list(OFFERED_TRANSPORTS)}",
            ),
        )
        return
    await websocket.accept(subprotocol=_subprotocol(websocket))
    metrics = cp.metrics
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        stream: ByteStream
        if transport == MuxTransport.name:
            stream = await conn.mux.open(session.id, timeout_s=OPEN_TIMEOUT_S)
        else:
            stream = await dedicated_streams(cp).open(conn, session.id, timeout_s=OPEN_TIMEOUT_S)
    except StreamRefused as exc:
        logger.warning("VNC stream to session %s refused: %s", session.id, exc.reason)
        await close_websocket(websocket, CLOSE_UNAVAILABLE, exc.reason)
        return
    opened = loop.time()
    metrics.vnc_stream_open.observe(opened - started)
    logger.info(
        "VNC proxy connection established for session %s (vnc_proxy: agent %s, transport %s%s)",
        session.id,
        session.agent_id,
        transport,
        ", for a viewer relayed from another replica" if relayed else "",
    )
    viewers = metrics.vnc_viewers.labels(session.id)
    viewers.inc()
    live = tunnel_service.tunnels(cp)
    tunnel = live.open(session.id, username, session.agent_id or "")
    traffic = Traffic()
    code, reason = CLOSE_UNAVAILABLE, "the relay failed"
    try:
        code, reason = await relay(
            websocket,
            stream,
            idle_timeout_s=cp.settings.vnc_proxy_timeout,
            to_stream=metrics.vnc_bytes.labels(session.id, "to_session"),
            to_websocket=metrics.vnc_bytes.labels(session.id, "to_viewer"),
            revoked=(tunnel.revoked, lambda: (tunnel_service.CLOSE_REVOKED, tunnel.reason)),
            traffic=traffic,
        )
    finally:
        live.close(tunnel)
        viewers.dec()
        await stream.close()
        _log_closed(session.id, loop.time() - opened, traffic, code, reason)
    await close_websocket(websocket, code, reason)


async def _forward(
    cp: ControlPlane, websocket: WebSocket, session: Session, username: str, replica: str, url: str
) -> None:
    """Relay the viewer to the replica ``replica`` at ``url``, which holds the session's
    agent."""
    try:
        ticket = await vnc_service.issue_relay_ticket(cp, session, username)
        stream = await dial_replica(
            url,
            RELAY_PATH.format(session_id=session.id),
            {"Authorization": f"Bearer {ticket}"},
            timeout_s=OPEN_TIMEOUT_S,
        )
    except ApiError as exc:
        await _refuse(websocket, exc)
        return
    except ReplicaRefused as exc:
        status = 503 if exc.status >= 500 else exc.status
        error = ERROR_CODES.get(status, "forbidden")
        await _refuse(websocket, ApiError(status, error, exc.message))
        return
    logger.info(
        "VNC proxy connection established for session %s "
        "(vnc_proxy: relayed to replica %s at %s, which holds agent %s)",
        session.id,
        replica,
        redact_url(url),
        session.agent_id,
    )
    loop = asyncio.get_running_loop()
    opened = loop.time()
    traffic = Traffic()
    code, reason = CLOSE_UNAVAILABLE, "the relay failed"
    try:
        code, reason = await relay_to_replica(
            websocket,
            stream,
            idle_timeout_s=cp.settings.vnc_proxy_timeout,
            gauge=cp.metrics.websockets.labels("vnc-relay"),
            subprotocol=_subprotocol(websocket),
            traffic=traffic,
        )
    finally:
        _log_closed(session.id, loop.time() - opened, traffic, code, reason)


def _log_closed(
    session_id: str, duration_s: float, traffic: Traffic, code: int, reason: str
) -> None:
    """Log the closing line of one viewer's proxy connection."""
    logger.info(
        "VNC proxy connection closed for session %s after %.1fs "
        "(vnc_proxy: %d bytes to the session, %d to the viewer; close %d%s)",
        session_id,
        duration_s,
        traffic.to_stream,
        traffic.to_websocket,
        code,
        f" {reason}" if reason else "",
    )


def _subprotocol(websocket: WebSocket) -> str | None:
    return SUBPROTOCOL if SUBPROTOCOL in websocket.scope.get("subprotocols", []) else None
