"""VNC viewer tokens: short-lived, single use, bound to one session and one user.

A viewer's WebSocket cannot carry an ``Authorization`` header from a browser, so the REST API
hands out a token for the URL instead. Only its SHA-256 is kept, in this process's memory:
a token is redeemed on the replica that issued it or not at all, and it is useless after
:data:`TOKEN_TTL_S` or its first use, whichever comes first.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.auth import hash_token
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import Session
from streamspace_controlplane.services import sessions
from streamspace_sdk.hooks import Principal

__all__ = ["TOKEN_TTL_S", "VncGrant", "VncTokens", "issue_token", "redeem_token", "tokens"]

TOKEN_TTL_S = 60.0
"""Seconds a VNC token is valid: enough to load the viewer page and connect, no more."""

MAX_TOKENS = 100_000
"""Most unexpired tokens kept; past it the oldest go first, so memory stays bounded."""

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
    """The VNC tokens issued by this process, by hash.

    Args:
        clock: seconds since the epoch (injectable for tests).
        ttl_s: how long a token is accepted.
    """

    def __init__(self, clock: Callable[[], float] = time.time, ttl_s: float = TOKEN_TTL_S) -> None:
        self._clock = clock
        self.ttl_s = ttl_s
        self._grants: dict[str, VncGrant] = {}

    def __len__(self) -> int:
        return len(self._grants)

    def issue(self, session_id: str, username: str) -> tuple[str, VncGrant]:
        """Return a new token and what it grants."""
        self._evict()
        token = secrets.token_urlsafe(32)
        grant = VncGrant(session_id, username, self._clock() + self.ttl_s)
        self._grants[hash_token(token)] = grant
        return token, grant

    def redeem(self, token: str, session_id: str) -> VncGrant | None:
        """Use up ``token``; return its grant if it is valid for ``session_id``, else ``None``.

        A token presented for another session is used up all the same.
        """
        grant = self._grants.pop(hash_token(token), None)
        if grant is None or grant.session_id != session_id:
            return None
        if self._clock() >= grant.expires_at:
            return None
        return grant

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, g in self._grants.items() if g.expires_at <= now]:
            del self._grants[key]
        while len(self._grants) >= MAX_TOKENS:
            del self._grants[next(iter(self._grants))]


def tokens(cp: ControlPlane) -> VncTokens:
    """Return the process's VNC tokens (made on first use; a test may put its own)."""
    found = cp.extras.get(_EXTRA)
    if not isinstance(found, VncTokens):
        found = cp.extras[_EXTRA] = VncTokens()
    return found


async def issue_token(cp: ControlPlane, actor: Principal, session_id: str) -> tuple[str, datetime]:
    """Issue a VNC token for a running session the caller may see.

    Raises:
        ApiError: 404 when the caller may not see the session; 409 when it is not running.
    """
    session = await sessions.get_session(cp, actor, session_id)
    _check_running(session)
    token, grant = tokens(cp).issue(session.id, actor.username)
    return token, datetime.fromtimestamp(grant.expires_at, UTC)


async def redeem_token(cp: ControlPlane, token: str | None, session_id: str) -> Session:
    """Use up a viewer's token and return the running session it opens.

    Raises:
        ApiError: 403 for a missing, unknown, expired, used or other-session token;
            409 when the session is no longer running.
    """
    grant = tokens(cp).redeem(token, session_id) if token else None
    if grant is None:
        raise ApiError(
            403, "forbidden", "invalid VNC token: unknown, expired, used or for another session"
        )
    session = await cp.store.get_session(session_id)
    if session is None:
        raise ApiError(404, "not_found", f"session {session_id} not found")
    _check_running(session)
    return session


def _check_running(session: Session) -> None:
    if session.state != "running" or session.agent_id is None:
        raise ApiError(
            409,
            "session_not_running",
            f"session {session.id} is {session.state}; its desktop can be viewed once running",
        )
