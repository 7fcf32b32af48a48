"""The agent registry: what registering, heartbeating and leaving mean for an agent.

The route owns the socket; this module decides. Registration is one atomic store call
that also checks the lease's fencing epoch, then the hub makes the new connection current
(closing a superseded one). Heartbeats and cleanup are conditional on the connection id,
so an old socket can neither keep an agent alive nor unregister its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from pydantic import JsonValue

from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.dispatcher import dispatcher_of
from streamspace_controlplane.hub.base import AgentConnection, HubUnavailable
from streamspace_controlplane.models import AgentRecord, utcnow
from streamspace_controlplane.reconciler import CLOSE_HEARTBEAT_TIMEOUT, reconciler_of
from streamspace_controlplane.store.base import StaleEpoch, StoreError
from streamspace_sdk.protocol import (
    PROTOCOL_VERSION,
    AgentHello,
    AgentWelcome,
    CommandAck,
    CommandResult,
    Error,
    Frame,
    Heartbeat,
    SessionStatusReport,
    Shutdown,
    VncClose,
    VncCredit,
    VncOpened,
)

__all__ = [
    "CLOSE_BAD_HELLO",
    "CLOSE_DUPLICATE",
    "CLOSE_FORBIDDEN",
    "CLOSE_HEARTBEAT_TIMEOUT",
    "CLOSE_NOT_RECORDED",
    "CLOSE_STALE_EPOCH",
    "CLOSE_STORE_UNAVAILABLE",
    "CLOSE_SUPERSEDED",
    "CLOSE_UNAUTHORIZED",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "Refused",
    "handle",
    "heartbeat_interval_s",
    "register",
    "unregister",
]

logger = logging.getLogger("streamspace.controlplane.agents")

CLOSE_SUPERSEDED = 4000
"""The agent connected again; this older socket is closed."""
CLOSE_BAD_HELLO = 4400
"""The first frame was not a usable ``agent.hello`` (malformed, or an unsupported version)."""
CLOSE_UNAUTHORIZED = 4401
"""No valid agent token (only seen where the server cannot refuse before accepting)."""
CLOSE_FORBIDDEN = 4403
"""The token is valid but for another agent id."""
CLOSE_STALE_EPOCH = 4409
"""A newer lease holder of the same agent id has registered (fencing)."""
CLOSE_DUPLICATE = 4429
"""Another process of this agent id is connected and alive, with no lower fencing epoch."""
CLOSE_STORE_UNAVAILABLE = 1013
"""A registration, ack, result or status report could not be stored ("try again later", RFC
6455): the agent reconnects with backoff, reports its sessions again, and the registration
sends it every unfinished command again."""
CLOSE_NOT_RECORDED = 1011
"""As :data:`CLOSE_STORE_UNAVAILABLE`, for an unexpected failure (logged with its traceback)."""

_LOCKS_KEY = "registry.locks"

SUPPORTED_PROTOCOL_VERSIONS: frozenset[int] = frozenset({PROTOCOL_VERSION})
"""Protocol versions this control plane speaks."""


class Refused(Exception):
    """The agent's socket must be closed with ``code`` and ``reason`` (a sentence)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def _registration_lock(cp: ControlPlane, agent_id: str) -> asyncio.Lock:
    locks = cp.extras.setdefault(_LOCKS_KEY, {})
    lock = locks.get(agent_id)
    if lock is None:
        lock = locks[agent_id] = asyncio.Lock()
    assert isinstance(lock, asyncio.Lock)
    return lock


def heartbeat_interval_s(cp: ControlPlane) -> float:
    """Return the heartbeat interval agents are told: a third of the timeout, so two can miss."""
    return cp.settings.agent_heartbeat_timeout / 3


_HELD_STATES = ("scheduled", "starting", "running", "stopping", "hibernated", "lost")
"""States in which a session lives on its agent's host, so moving the agent would strand it."""


async def _refuse_duplicate(cp: ControlPlane, hello: AgentHello, now: datetime) -> None:
    """Refuse a process of another scope that would split or strand the agent's sessions.

    A process of the same scope (``instance_id``: where the sessions live) or a new lease
    holder (higher fencing epoch) replaces the old socket. A process of another scope is
    refused while the connected one is alive, and while sessions the control plane places
    on this agent are not among those it reports: they live where the first one ran, and
    taking over would mark them failed while their desktops run on.
    """
    known = await cp.store.get_agent(hello.agent_id)
    if known is None:
        return
    instance = known.metadata.get("instance_id") or ""
    if not instance or not hello.instance_id or instance == hello.instance_id:
        return
    if hello.fencing_epoch > known.fencing_epoch:
        return
    timeout = timedelta(seconds=cp.settings.agent_heartbeat_timeout)
    alive = (
        known.status == "online"
        and known.last_heartbeat is not None
        and now - known.last_heartbeat < timeout
        and await _held(cp, hello.agent_id, known.websocket_conn_id)
    )
    reported = {s.session_id for s in hello.sessions}
    held, _total = await cp.store.list_sessions(
        agent_id=hello.agent_id, states=_HELD_STATES, limit=1000
    )
    stranded = [s.id for s in held if s.id not in reported]
    if not alive and not stranded:
        return
    if alive:
        reason = "already connected from another process; run one per AGENT_ID or use HA"
    else:
        reason = f"{len(stranded)} session(s) live where this agent last ran; start it there"
    logger.warning(
        "Refused agent %s from %s (it last ran at %s): %s",
        hello.agent_id,
        hello.instance_id,
        instance,
        reason,
    )
    raise Refused(CLOSE_DUPLICATE, reason)


async def _held(cp: ControlPlane, agent_id: str, conn_id: str | None) -> bool:
    """Whether a replica holds the agent's stored connection (unsure counts as held)."""
    live = cp.hub.local(agent_id)
    if live is not None:
        return live.conn_id == conn_id
    try:
        return await cp.hub.locate(agent_id) is not None
    except HubUnavailable:
        return True


async def register(
    cp: ControlPlane, conn: AgentConnection, hello: AgentHello, *, token_agent_id: str
) -> AgentRecord:
    """Register the agent behind ``conn`` from its hello, welcome it, and catch it up.

    Stores the agent ``online`` with the connection's id, makes the connection current in
    the hub (closing the one it supersedes), sends ``agent.welcome``, then sends every
    command it has not finished, reconciles the sessions it reports, and kicks the scheduler.

    When the store fails before the welcome, the registration is refused with
    :data:`CLOSE_STORE_UNAVAILABLE`; when it fails taking in the sessions the hello
    reports, the connection is closed with that code, so the agent says it all again.

    Raises:
        Refused: The hello names another agent than the token, speaks an unsupported
            protocol version, or carries a stale fencing epoch; the token was revoked
            while it registered; or the store failed.
    """
    if hello.agent_id != token_agent_id:
        raise Refused(
            CLOSE_FORBIDDEN,
            f"token is for agent {token_agent_id!r}, not {hello.agent_id!r}",
        )
    if hello.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_PROTOCOL_VERSIONS))
        raise Refused(
            CLOSE_BAD_HELLO,
            f"unsupported protocol version {hello.protocol_version}; supported: {supported}",
        )
    metadata: dict[str, JsonValue] = {
        "instance_id": hello.instance_id,
        "agent_version": hello.agent_version,
        "protocol_version": hello.protocol_version,
        "transports": list(hello.transports),
        "lease_holder": hello.lease_holder,
    }
    # One registration of an agent at a time in this process, so the store's current
    # connection and the hub's always end up the same one.
    async with _registration_lock(cp, hello.agent_id):
        now = utcnow()
        try:
            await _refuse_duplicate(cp, hello, now)
        except StoreError as exc:
            raise _not_registered(hello.agent_id, exc) from None
        try:
            agent = await cp.store.register_agent(
                AgentRecord(
                    agent_id=hello.agent_id,
                    platform=hello.platform,
                    region=hello.region,
                    labels=dict(hello.labels),
                    status="online",
                    capacity=hello.capacity,
                    usage=hello.usage,
                    metadata=metadata,
                    websocket_conn_id=conn.conn_id,
                    last_heartbeat=now,
                    fencing_epoch=hello.fencing_epoch,
                    created_at=now,
                )
            )
        except StaleEpoch as exc:
            logger.warning("Refused agent %s: %s", hello.agent_id, exc)
            raise Refused(
                CLOSE_STALE_EPOCH,
                f"stale fencing epoch {exc.epoch} < {exc.highest}: a newer leader exists",
            ) from None
        except StoreError as exc:
            raise _not_registered(hello.agent_id, exc) from None
        old = await cp.hub.attach(conn)
        if not await _token_active(cp, conn):
            with contextlib.suppress(StoreError):  # offline once its heartbeat is missed
                await unregister(cp, conn)
            raise Refused(CLOSE_FORBIDDEN, "the agent token was revoked")
        if old is not None:
            logger.info(
                "Agent %s reconnected; closing its previous connection %s",
                old.agent_id,
                old.conn_id,
            )
            await old.close(CLOSE_SUPERSEDED, "superseded by a newer connection")
    await conn.send(
        AgentWelcome(connection_id=conn.conn_id, heartbeat_interval_s=heartbeat_interval_s(cp))
    )
    logger.info(
        "Agent registered successfully: %s (platform %s, region %s, %d sessions reported, "
        "connection %s)",
        agent.agent_id,
        agent.platform,
        agent.region,
        len(hello.sessions),
        conn.conn_id,
    )
    dispatcher_of(cp).agent_connected(agent.agent_id)
    try:
        await reconciler_of(cp).on_agent_registered(agent.agent_id, hello.sessions)
    except Exception as exc:
        # What the hello reports (a lost session that runs on, say) is said only once.
        code, why = CLOSE_NOT_RECORDED, "internal error"
        if isinstance(exc, StoreError):
            code, why = CLOSE_STORE_UNAVAILABLE, "the store is unavailable"
            logger.warning(
                "Could not record the sessions agent %s reported; closing its connection so "
                "it reports them again: %s",
                agent.agent_id,
                exc,
            )
        else:
            logger.exception(
                "Reconciling the sessions agent %s reported failed; closing its connection "
                "so it reports them again",
                agent.agent_id,
            )
        await conn.close(code, f"could not record the sessions reported: {why}; reconnect")
        return agent
    cp.scheduler.kick()
    return agent


def _not_registered(agent_id: str, exc: StoreError) -> Refused:
    logger.warning("Could not register agent %s: %s", agent_id, exc)
    return Refused(CLOSE_STORE_UNAVAILABLE, "could not register: the store is unavailable")


async def handle(cp: ControlPlane, conn: AgentConnection, frame: Frame) -> Error | None:
    """Act on one frame from a registered agent.

    Returns:
        An error frame to answer with (the connection stays up), or ``None``.

    Raises:
        Refused: The heartbeat found that another connection of the agent has taken over,
            or that the agent was marked offline meanwhile; it must register again. Or an
            ack, result or status report could not be recorded; it must send it again.
    """
    agent_id = conn.agent_id
    if isinstance(frame, Heartbeat):
        try:
            current = await cp.store.heartbeat_agent(
                agent_id, conn.conn_id, frame.usage.model_dump(mode="json"), utcnow()
            )
        except StoreError as exc:
            # Nothing is lost: the next heartbeat counts, and two may miss before a timeout.
            logger.warning("Could not record a heartbeat of agent %s: %s", agent_id, exc)
            return Error(
                code="unavailable",
                message="the store is unavailable; the heartbeat was not recorded",
                ref=frame.type,
            )
        if not current:
            agent = await cp.store.get_agent(agent_id)
            if agent is not None and agent.websocket_conn_id == conn.conn_id:
                raise Refused(CLOSE_HEARTBEAT_TIMEOUT, "marked offline after missed heartbeats")
            raise Refused(CLOSE_SUPERSEDED, "superseded by a newer connection")
        await cp.hub.refresh(conn)
        return None
    if isinstance(frame, CommandAck | CommandResult | SessionStatusReport):
        return await _record(cp, agent_id, frame)
    if isinstance(frame, Shutdown):
        logger.info("Agent %s is shutting down: %s", agent_id, frame.reason or "no reason given")
        return None
    if isinstance(frame, Error):
        logger.warning(
            "Agent %s refused a frame: %s: %s (ref %s)",
            agent_id,
            frame.code,
            frame.message,
            frame.ref,
        )
        return None
    if isinstance(frame, VncOpened | VncClose | VncCredit):
        return Error(
            code="unsupported",
            message=f"{frame.type} belongs to a VNC stream, which the agent socket's "
            "streams handle, not the registry",
            ref=frame.type,
        )
    if isinstance(frame, AgentHello):
        message = "already registered: agent.hello is only valid as the first frame"
    else:
        message = f"{frame.type} is not a frame an agent sends to the control plane"
    return Error(code="unexpected", message=message, ref=frame.type)


async def _record(
    cp: ControlPlane, agent_id: str, frame: CommandAck | CommandResult | SessionStatusReport
) -> Error | None:
    """Act on a frame whose loss would lose state, or refuse the connection.

    An error frame would not do: the agent has sent it and moved on. Closing the socket
    makes it reconnect, and the registration catches it up: every unfinished command is
    sent again (an acked one too), the agent answers each with its result (a finished
    one from memory, so nothing runs twice), and its hello reports every session's state.

    Raises:
        Refused: The store failed (:data:`CLOSE_STORE_UNAVAILABLE`), or something
            unexpected did (:data:`CLOSE_NOT_RECORDED`).
    """
    try:
        if isinstance(frame, CommandAck):
            return await dispatcher_of(cp).on_ack(agent_id, frame)
        if isinstance(frame, CommandResult):
            return await dispatcher_of(cp).on_result(agent_id, frame)
        await reconciler_of(cp).on_status(agent_id, frame.status)
        return None
    except StoreError as exc:
        logger.warning(
            "Could not record %s from agent %s; closing its connection so it sends it again: %s",
            frame.type,
            agent_id,
            exc,
        )
        raise Refused(
            CLOSE_STORE_UNAVAILABLE,
            f"could not record {frame.type}: the store is unavailable; reconnect and send it again",
        ) from None
    except Exception:
        logger.exception(
            "Recording %s from agent %s failed; closing its connection so it sends it again",
            frame.type,
            agent_id,
        )
        raise Refused(
            CLOSE_NOT_RECORDED,
            f"could not record {frame.type}: internal error; reconnect and send it again",
        ) from None


async def _token_active(cp: ControlPlane, conn: AgentConnection) -> bool:
    """Whether the token ``conn`` authenticated with is still active, checked once it is
    attached: a revocation made earlier is seen here, one made later finds it in the hub
    (the revocation closes the sockets the hub has), so none slips between the two.

    Raises:
        Refused: the store failed (:data:`CLOSE_STORE_UNAVAILABLE`).
    """
    try:
        tokens = await cp.store.list_agent_tokens(conn.agent_id)
    except StoreError as exc:
        with contextlib.suppress(StoreError):
            await unregister(cp, conn)
        raise _not_registered(conn.agent_id, exc) from None
    return any(t.token_id == conn.token_id and t.revoked_at is None for t in tokens)


async def unregister(cp: ControlPlane, conn: AgentConnection) -> None:
    """Forget ``conn``; mark the agent offline only if it is still its current connection."""
    await cp.hub.detach(conn)
    if cp.hub.local(conn.agent_id) is None:
        dispatcher_of(cp).agent_disconnected(conn.agent_id)
    if await cp.store.set_agent_offline(conn.agent_id, conn.conn_id):
        logger.info("Agent %s disconnected (connection %s)", conn.agent_id, conn.conn_id)
    else:
        logger.info(
            "Connection %s of agent %s closed; it was no longer current",
            conn.conn_id,
            conn.agent_id,
        )
