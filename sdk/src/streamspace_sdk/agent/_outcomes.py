"""How a connection attempt ended: what to log, and what the agent does next.

The close codes are the control plane's (``routes/agents.py``); the SDK may not import the
control plane, so they are repeated here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed

from streamspace_sdk.protocol import PROTOCOL_VERSION

__all__ = ["Outcome", "closed", "refused_http"]

logger = logging.getLogger("streamspace.agent")

SUPERSEDED = 4000
"""A newer connection of the same agent id took over."""
BAD_HELLO = 4400
"""The hello was malformed, or named a protocol version the control plane does not speak."""
UNAUTHORIZED = 4401
"""No valid agent token (where the server could not refuse with HTTP 401)."""
FORBIDDEN = 4403
"""The token belongs to another agent id."""
TIMED_OUT = 4408
"""No hello, or no heartbeat, in time."""
STALE_EPOCH = 4409
"""The fencing epoch is below the highest the control plane has seen for the agent id."""
DUPLICATE = 4429
"""Another live process with the same agent id is connected."""


@dataclass(frozen=True)
class Outcome:
    """How one connection attempt ended, and what to do next."""

    reason: str
    """Why there is no connection now, for ``/ready`` and the logs."""
    lasted_s: float = 0.0
    """How long a registered connection stayed up; 0 when it never registered."""
    wait_s: float | None = None
    """Wait this long before the next attempt instead of the backoff."""
    step_back: bool = False
    """Stop leading: the control plane knows a newer lease holder."""


def refused_http(status: int, url: str, agent_id: str) -> Outcome:
    """Log a handshake refused with HTTP ``status``; the agent retries with backoff."""
    if status in (401, 403):
        logger.error(
            "The control plane refused AGENT_TOKEN (HTTP %d): set AGENT_TOKEN to the token "
            "`streamspace-controlplane create-agent-token %s` printed; retrying with backoff",
            status,
            agent_id,
        )
        return Outcome(f"the control plane refused AGENT_TOKEN (HTTP {status})")
    logger.warning(
        "The control plane answered HTTP %d at %s%s; retrying with backoff",
        status,
        url,
        " (is CONTROL_PLANE_URL right?)" if status == 404 else "",
    )
    return Outcome(f"the control plane answered HTTP {status}")


def closed(
    exc: ConnectionClosed, *, lasted_s: float, agent_id: str, ha: bool, superseded_wait_s: float
) -> Outcome:
    """Log why the control plane closed the socket and decide what comes next.

    Superseded (4000): wait ``superseded_wait_s``, so two processes sharing an agent id take
    turns slowly rather than flapping. Stale epoch (4409): with HA, step back to follower;
    without, retry. Everything else: retry with backoff.
    """
    rcvd = exc.rcvd
    code = rcvd.code if rcvd is not None else 1006
    reason = rcvd.reason if rcvd is not None else ""
    said = f"{code}: {reason}" if reason else str(code)
    if code == DUPLICATE:
        logger.error(
            "Registration refused (%s): another agent process with the same AGENT_ID (%s) is "
            "connected and alive; run one process per AGENT_ID, or turn ENABLE_HA on. "
            "Retrying in %gs, so this one takes over if the other goes away",
            said,
            agent_id,
            superseded_wait_s,
        )
        return Outcome(
            "another process with this AGENT_ID is connected",
            lasted_s=lasted_s,
            wait_s=superseded_wait_s,
        )
    if code == SUPERSEDED:
        logger.error(
            "Connection superseded (%s): another agent process with the same AGENT_ID (%s) "
            "connected; run one process per AGENT_ID, or turn ENABLE_HA on. Retrying in %gs",
            said,
            agent_id,
            superseded_wait_s,
        )
        return Outcome(
            "superseded by another process with this AGENT_ID",
            lasted_s=lasted_s,
            wait_s=superseded_wait_s,
        )
    if code in (UNAUTHORIZED, FORBIDDEN):
        logger.error(
            "The control plane refused AGENT_TOKEN for AGENT_ID %s (%s): use the token "
            "`streamspace-controlplane create-agent-token %s` printed; retrying with backoff",
            agent_id,
            said,
            agent_id,
        )
        return Outcome(f"the control plane refused AGENT_TOKEN ({said})", lasted_s=lasted_s)
    if code == BAD_HELLO:
        logger.error(
            "The control plane refused the registration (%s); this agent speaks protocol "
            "version %d. Retrying with backoff",
            said,
            PROTOCOL_VERSION,
        )
        return Outcome(f"registration refused ({said})", lasted_s=lasted_s)
    if code == STALE_EPOCH:
        if ha:
            logger.error(
                "The control plane refused the fencing epoch as stale (%s): another leader of "
                "AGENT_ID %s registered; stepping back to FOLLOWER",
                said,
                agent_id,
            )
            return Outcome(f"stale fencing epoch ({said})", lasted_s=lasted_s, step_back=True)
        logger.error(
            "The control plane refused fencing epoch 0 as stale (%s): an HA agent with "
            "AGENT_ID %s registered with a lease; turn ENABLE_HA on here too. Retrying with "
            "backoff",
            said,
            agent_id,
        )
        return Outcome(f"stale fencing epoch ({said})", lasted_s=lasted_s)
    if code == TIMED_OUT:
        logger.warning("The control plane timed the connection out (%s)", said)
    elif code in (1000, 1001):
        logger.info("The control plane closed the connection (%s)", said)
    else:
        logger.warning("Connection to the control plane lost (%s)", said)
    return Outcome(f"connection closed ({said})", lasted_s=lasted_s)
