"""Agents as admins manage them: list, read, delete, and their tokens.

The agent side (registration, heartbeats, commands) lives in ``services/registry.py`` and
the agent WebSocket endpoint; this module is the admin's view.
"""

from __future__ import annotations

import re

from pydantic import JsonValue

from streamspace_controlplane import auth
from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.audit import audit
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import AgentRecord, AgentToken, utcnow
from streamspace_controlplane.reconciler import reconciler_of
from streamspace_controlplane.schemas import AGENT_ID_PATTERN
from streamspace_controlplane.services import tunnels
from streamspace_controlplane.store.base import Conflict
from streamspace_sdk.hooks import Principal

__all__ = [
    "create_token",
    "delete_agent",
    "get_agent",
    "list_agents",
    "list_tokens",
    "revoke_token",
]


async def list_agents(cp: ControlPlane) -> list[AgentRecord]:
    """Return every agent the control plane has seen, by id."""
    return await cp.store.list_agents()


async def get_agent(cp: ControlPlane, agent_id: str) -> AgentRecord:
    """Return one agent.

    Raises:
        ApiError: 404 when unknown.
    """
    agent = await cp.store.get_agent(agent_id)
    if agent is None:
        raise ApiError(404, "not_found", f"no agent {agent_id!r}")
    return agent


async def delete_agent(cp: ControlPlane, actor: Principal, agent_id: str) -> None:
    """Delete an agent, connected or not, so that it is gone until an admin says otherwise.

    In this order: every active token of the agent is revoked, so it cannot connect again
    with one; its socket and its viewers' tunnels close on whichever replica holds them
    (close code 4403, "the agent was deleted"); its record goes; and the sessions placed
    on it are let go (:meth:`~streamspace_controlplane.reconciler.Reconciler.on_agent_deleted`:
    each becomes ``stopped`` with no agent, to delete or to run again elsewhere, and its
    open commands fail). What its platform still runs is not stopped: nobody is left to
    tell it. To bring the agent back, issue it a new token.

    Raises:
        ApiError: 404 when unknown.
    """
    agent = await get_agent(cp, agent_id)
    now = utcnow()
    revoked: list[JsonValue] = [
        t.token_id
        for t in await cp.store.list_agent_tokens(agent_id)
        if t.revoked_at is None and await cp.store.revoke_agent_token(t.token_id, now)
    ]
    await tunnels.revoke(cp, "agent", agent_id, reason="the agent was deleted")
    if not await cp.store.delete_agent(agent_id):
        raise ApiError(404, "not_found", f"no agent {agent_id!r}")
    released = await reconciler_of(cp).on_agent_deleted(agent_id)
    await audit(
        cp,
        actor.username,
        "agent.delete",
        f"agent/{agent_id}",
        {"was": agent.status, "tokens_revoked": revoked, "sessions_released": released},
    )


async def create_token(
    cp: ControlPlane, agent_id: str, *, actor: Principal | str
) -> tuple[str, AgentToken]:
    """Issue a token for ``agent_id`` (which need not have connected yet).

    Args:
        cp: The control plane.
        actor: The admin, or a name such as ``cli`` for the command line.
        agent_id: The agent the token authenticates.

    Returns:
        The plaintext token, to show once, and the stored record (hash only).
    """
    actor_name = actor if isinstance(actor, str) else actor.username
    if not re.match(AGENT_ID_PATTERN, agent_id):
        raise ApiError(
            422,
            "validation_error",
            f"bad agent id {agent_id!r}: use 1-63 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit",
        )
    for _ in range(3):
        token, record = auth.new_agent_token(agent_id)
        try:
            stored = await cp.store.create_agent_token(record)
            break
        except Conflict:  # 64-bit token ids; a collision is astronomically rare
            continue
    else:
        raise ApiError(409, "conflict", "could not allocate a token id; try again")
    await audit(
        cp, actor_name, "agent_token.create", f"agent/{agent_id}", {"token_id": stored.token_id}
    )
    return token, stored


async def list_tokens(cp: ControlPlane, agent_id: str | None = None) -> list[AgentToken]:
    """Return tokens (never the tokens themselves), newest first."""
    return await cp.store.list_agent_tokens(agent_id)


async def revoke_token(cp: ControlPlane, actor: Principal, token_id: str) -> None:
    """Revoke a token: agents presenting it are refused from now on, and an agent
    connected with it is disconnected, its viewers with it, on whichever replica.

    Raises:
        ApiError: 404 when there is no such token or it is already revoked.
    """
    found = [t for t in await cp.store.list_agent_tokens() if t.token_id == token_id]
    if not await cp.store.revoke_agent_token(token_id, utcnow()):
        raise ApiError(404, "not_found", f"no active agent token {token_id!r}")
    await audit(cp, actor.username, "agent_token.revoke", f"agent-token/{token_id}")
    if found:
        await tunnels.revoke(cp, "agent-token", token_id, agent_id=found[0].agent_id)
