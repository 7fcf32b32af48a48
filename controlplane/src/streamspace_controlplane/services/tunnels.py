"""Live viewer tunnels, and revoking them with what allowed them.

:func:`revoke` ends, on every replica, the viewers of a session asked to stop or
hibernate, of a deleted or disabled user, and of an agent that is deleted or whose token is
revoked (whose socket closes too). Every viewer's bytes pass through the replica holding
its agent, so closing there ends a relayed viewer as well; the others are told through the
hub.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Literal

from streamspace_controlplane.core import ControlPlane

__all__ = ["CLOSE_REVOKED", "Tunnel", "Tunnels", "apply_revocation", "revoke", "tunnels"]

logger = logging.getLogger("streamspace.controlplane.vnc")

CLOSE_REVOKED = 4403
"""Close code of a viewer (and of an agent socket) whose grant was revoked."""

RevokedBy = Literal["session", "user", "agent-token", "agent"]

_TUNNELS = "vnc.tunnels"


@dataclass(eq=False)
class Tunnel:
    """One viewer served by this replica; :attr:`revoked` is set to end it."""

    session_id: str
    username: str
    agent_id: str
    revoked: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class Tunnels:
    """The viewer tunnels this replica serves, so that a revocation can end them."""

    def __init__(self) -> None:
        self._open: set[Tunnel] = set()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, session_id: str, username: str, agent_id: str) -> Tunnel:
        """Register a viewer's tunnel; :meth:`close` it when it ends."""
        tunnel = Tunnel(session_id, username, agent_id)
        self._open.add(tunnel)
        return tunnel

    def close(self, tunnel: Tunnel) -> None:
        """Forget a tunnel that ended."""
        self._open.discard(tunnel)

    def revoke(self, by: RevokedBy, value: str, reason: str) -> int:
        """End the tunnels of a session, a user or an agent; return how many."""
        key = {
            "session": "session_id",
            "user": "username",
            "agent-token": "agent_id",
            "agent": "agent_id",
        }[by]
        ended = 0
        for tunnel in list(self._open):
            if getattr(tunnel, key) == value and not tunnel.revoked.is_set():
                tunnel.reason = reason
                tunnel.revoked.set()
                ended += 1
        return ended


def tunnels(cp: ControlPlane) -> Tunnels:
    """Return the process's live viewer tunnels (made on first use)."""
    found = cp.extras.get(_TUNNELS)
    if not isinstance(found, Tunnels):
        found = cp.extras[_TUNNELS] = Tunnels()
    return found


async def revoke(
    cp: ControlPlane, by: RevokedBy, value: str, *, agent_id: str = "", reason: str = ""
) -> None:
    """End, on every replica, the live access that ``by`` = ``value`` granted.

    ``session``: its viewers (it is asked to stop or hibernate); ``user``: the user's
    viewers; ``agent-token``: the agent socket authenticated by that token id and the
    viewers of ``agent_id``, its agent; ``agent``: the socket of agent ``value``, whatever
    its token, and its viewers.

    Args:
        cp: The control plane.
        by: What was revoked.
        value: Its id (session id, username, token id or agent id).
        agent_id: For ``agent-token``, the token's agent.
        reason: The close reason viewers see; by default one naming what was revoked
            (a user's says "deleted", so pass one when a user is disabled).
    """
    arg = json.dumps({"by": by, "value": value, "agent_id": agent_id, "reason": reason})
    apply_revocation(cp, arg)
    cp.hub.notify_all("revoke", arg)


def apply_revocation(cp: ControlPlane, arg: str) -> None:
    """Act on a revocation here (made by :func:`revoke` on this or another replica)."""
    try:
        message = json.loads(arg)
        by, value, agent_id = message["by"], str(message["value"]), str(message["agent_id"])
        given = str(message.get("reason") or "")  # absent from an older replica's notice
    except (ValueError, TypeError, KeyError, AttributeError):
        logger.warning("Ignored a malformed revocation: %.200r", arg)
        return
    if by in ("agent-token", "agent"):
        if by == "agent":
            agent_id = value
        conn = cp.hub.local(agent_id)
        if conn is None or (by == "agent-token" and conn.token_id != value):
            return
        reason = given or (
            "the agent's token was revoked" if by == "agent-token" else "the agent was deleted"
        )
        tunnels(cp).revoke(by, agent_id, reason)
        logger.info("Closing agent %s's connection: %s", agent_id, reason)
        task = asyncio.get_running_loop().create_task(conn.close(CLOSE_REVOKED, reason))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
        return
    if by not in ("session", "user"):
        logger.warning("Ignored a revocation of unknown kind: %.200r", arg)
        return
    default = "the session is stopping" if by == "session" else "the user was deleted"
    reason = given or default
    ended = tunnels(cp).revoke(by, value, reason)
    if ended:
        logger.info("Closed %d VNC viewer(s) of %s %s: %s", ended, by, value, reason)


_pending: set[asyncio.Task[None]] = set()
"""Agent sockets being closed after a revocation (kept so the tasks are not collected)."""
