"""VNC viewer tokens: short-lived, single use, bound to one session and one user.

A viewer's WebSocket cannot carry an ``Authorization`` header from a browser, so the REST API
hands out a token for the URL instead. Only its SHA-256 is kept, as a ticket of the hub, so
a token issued by one replica is redeemed on whichever one the viewer's socket lands on,
once, and never after :data:`TOKEN_TTL_S`.

A replica that relays a viewer to the replica holding the agent presents a relay ticket of
the same kind: single use, bound to the session, valid for :data:`RELAY_TTL_S`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.auth import hash_token
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.hub.base import Hub, HubUnavailable
from streamspace_controlplane.models import Session
from streamspace_controlplane.services import sessions
from streamspace_sdk.hooks import Principal

__all__ = [
    "RELAY_TTL_S",
    "TOKEN_TTL_S",
    "VncGrant",
    "VncTokens",
    "issue_relay_ticket",
    "issue_token",
    "redeem_relay_ticket",
    "redeem_token",
    "tokens",
]


TOKEN_TTL_S = 60.0
"""Seconds a VNC token is valid: enough to load the viewer page and connect, no more."""
RELAY_TTL_S = 10.0
"""Seconds a relay ticket is valid: it is presented at once, by the replica that made it."""

_EXTRA = "vnc.tokens"


@dataclass(frozen=True)
class VncGrant:
    """What a redeemed token allows: this user views this session."""

    session_id: str
    """The session the token was issued for."""
    username: str
    """The user it was issued to."""
    expires_at: float
    """When it stops being accepted, in seconds since the epoch."""


class VncTokens:
    """VNC tokens kept as tickets of ``hub``, by hash, under one kind (``vnc``, ``relay``).

    Args:
        hub: where the tickets live (every replica's hub sees the same ones).
        clock: seconds since the epoch (injectable for tests).
        ttl_s: how long a token is accepted.
        kind: prefix of the ticket keys, so a token of one kind never opens another.
    """

    def __init__(
        self,
        hub: Hub,
        clock: Callable[[], float] = time.time,
        ttl_s: float = TOKEN_TTL_S,
        kind: str = "vnc",
    ) -> None:
        self._hub = hub
        self._clock = clock
        self.ttl_s = ttl_s
        self._kind = kind

    def _key(self, token: str) -> str:
        return f"{self._kind}:{hash_token(token)}"

    async def issue(self, session_id: str, username: str) -> tuple[str, VncGrant]:
        """Return a new token and what it grants.

        Raises:
            HubUnavailable: the hub could not keep it.
        """
        token = secrets.token_urlsafe(32)
        grant = VncGrant(session_id, username, self._clock() + self.ttl_s)
        await self._hub.put_ticket(self._key(token), json.dumps(asdict(grant)), self.ttl_s)
        return token, grant

    async def redeem(self, token: str, session_id: str) -> VncGrant | None:
        """Use up ``token``; return its grant if it is valid for ``session_id``, else ``None``.

        A token presented for another session is used up all the same.

        Raises:
            HubUnavailable: the hub could not be asked.
        """
        raw = await self._hub.take_ticket(self._key(token))
        if raw is None:
            return None
        try:
            grant = VncGrant(**json.loads(raw))
        except (TypeError, ValueError):
            return None
        if grant.session_id != session_id or self._clock() >= grant.expires_at:
            return None
        return grant


def tokens(cp: ControlPlane) -> VncTokens:
    """Return the process's VNC tokens (made on first use; a test may put its own)."""
    found = cp.extras.get(_EXTRA)
    if not isinstance(found, VncTokens):
        found = cp.extras[_EXTRA] = VncTokens(cp.hub)
    return found


def _relay_tickets(cp: ControlPlane) -> VncTokens:
    found = cp.extras.get(_EXTRA + ".relay")
    if not isinstance(found, VncTokens):
        found = cp.extras[_EXTRA + ".relay"] = VncTokens(cp.hub, ttl_s=RELAY_TTL_S, kind="relay")
    return found


def _unavailable(exc: HubUnavailable) -> ApiError:
    return ApiError(503, "unavailable", f"VNC tokens are unavailable: {exc}")


async def issue_token(cp: ControlPlane, actor: Principal, session_id: str) -> tuple[str, datetime]:
    """Issue a VNC token for a running session the caller may see.

    Raises:
        ApiError: 404 when the caller may not see the session; 409 when it is not running;
            503 when the hub cannot keep tokens.
    """
    session = await sessions.get_session(cp, actor, session_id)
    _check_running(session)
    try:
        token, grant = await tokens(cp).issue(session.id, actor.username)
    except HubUnavailable as exc:
        raise _unavailable(exc) from None
    return token, datetime.fromtimestamp(grant.expires_at, UTC)


async def redeem_token(
    cp: ControlPlane, token: str | None, session_id: str
) -> tuple[Session, VncGrant]:
    """Use up a viewer's token; return the running session it opens and its grant.

    Raises:
        ApiError: 403 for a missing, unknown, expired, used or other-session token, or
            one whose user was deleted or disabled since; 409 when the session is no
            longer running; 503 when the hub cannot be asked.
    """
    return await _redeem(cp, tokens(cp), token, session_id, "VNC token")


async def issue_relay_ticket(cp: ControlPlane, session: Session, username: str) -> str:
    """Return a ticket another replica accepts, once, to serve ``session``'s VNC to a viewer
    of ``username`` relayed from this one.

    Raises:
        ApiError: 503 when the hub cannot keep it.
    """
    try:
        ticket, _grant = await _relay_tickets(cp).issue(session.id, username)
    except HubUnavailable as exc:
        raise _unavailable(exc) from None
    return ticket


async def redeem_relay_ticket(
    cp: ControlPlane, ticket: str | None, session_id: str
) -> tuple[Session, VncGrant]:
    """Use up a relay ticket; return the running session it opens and its grant. Errors
    as :func:`redeem_token`."""
    return await _redeem(cp, _relay_tickets(cp), ticket, session_id, "relay ticket")


async def _redeem(
    cp: ControlPlane, kept: VncTokens, token: str | None, session_id: str, what: str
) -> tuple[Session, VncGrant]:
    try:
        grant = await kept.redeem(token, session_id) if token else None
    except HubUnavailable as exc:
        raise _unavailable(exc) from None
    if grant is None:
        raise ApiError(
            403, "forbidden", f"invalid {what}: unknown, expired, used or for another session"
        )
    user = await cp.store.get_user(grant.username)
    if user is None:  # deleted since it was issued
        raise ApiError(403, "forbidden", f"invalid {what}: its user no longer exists")
    if user.disabled:  # disabled since it was issued
        raise ApiError(403, "user_disabled", f"invalid {what}: its user is disabled")
    session = await cp.store.get_session(session_id)
    if session is None:
        raise ApiError(404, "not_found", f"session {session_id} not found")
    _check_running(session)
    return session, grant


def _check_running(session: Session) -> None:
    if session.state != "running" or session.agent_id is None:
        raise ApiError(
            409,
            "session_not_running",
            f"session {session.id} is {session.state}; its desktop can be viewed once running",
        )
