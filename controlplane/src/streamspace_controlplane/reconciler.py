"""The reconciler: converges what users want with what agents report.

Each pass, and at every agent registration, it compares every placed session's desired
state with its actual state and enqueues the command that closes the gap (``stop``,
``hibernate``, ``wake``, or ``start`` when the desired state changed after a stop or a
failure). It also keeps agents honest: an agent silent past ``AGENT_HEARTBEAT_TIMEOUT`` is
marked offline and its socket closed, and the sessions of an agent offline past
``LOST_GRACE_PERIOD`` become ``lost``, and ``running`` again if it comes back with them.
A result the store kept but whose session never moved (the store failed in between) is
applied again (:meth:`~streamspace_controlplane.dispatcher.Dispatcher.reapply_results`).
The sessions of an agent an admin deletes are stopped and unplaced at once
(:meth:`Reconciler.on_agent_deleted`): no agent is left to tell.
Sessions an agent reports that the store does not know are logged and audited, never
stopped: they may belong to another control plane sharing the platform.

With several replicas the full passes run on the leading one; a replica converges the
sessions its users touch and those its agents report at once, since every command is
idempotent on ``(session_id, generation)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import get_args

from pydantic import JsonValue

from streamspace_controlplane._loop import KickLoop
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.dispatcher import dispatcher_of, format_duration, status_metadata
from streamspace_controlplane.models import ACTIVE_STATES, AgentRecord, Session, utcnow
from streamspace_controlplane.services.audit import audit
from streamspace_controlplane.store.base import NotFound
from streamspace_sdk.platform import Action, SessionState, SessionStatus

__all__ = ["CLOSE_HEARTBEAT_TIMEOUT", "Reconciler", "reconciler_of"]

logger = logging.getLogger("streamspace.controlplane.reconciler")

CLOSE_HEARTBEAT_TIMEOUT = 4408
"""WebSocket close code for an agent that stopped heartbeating."""

_ALL_STATES: tuple[SessionState, ...] = get_args(SessionState)
_REPORTED: frozenset[str] = frozenset(
    {"starting", "running", "stopping", "stopped", "hibernated", "failed"}
)
"""States an agent may report; the others are the control plane's to set."""
_HAS_COMPUTE: tuple[str, ...] = ("starting", "running", "stopping")
"""States that become ``lost`` when their agent is gone past the grace period."""
_PAGE = 1000


def reconciler_of(cp: ControlPlane) -> Reconciler:
    """Return the process's reconciler (built with the control plane)."""
    if not isinstance(cp.reconciler, Reconciler):
        raise RuntimeError(
            "this control plane has no Reconciler; build it with build_control_plane"
        )
    return cp.reconciler


class Reconciler(KickLoop):
    """Converges desired and actual state; runs when kicked and every ``RECONCILE_INTERVAL``.

    Args:
        cp: The control plane.
        interval_s: Seconds between passes when nobody kicks; ``reconcile_interval``.
    """

    def __init__(self, cp: ControlPlane, *, interval_s: float | None = None) -> None:
        super().__init__(
            "reconciler", interval_s if interval_s is not None else cp.settings.reconcile_interval
        )
        self.cp = cp
        self._settled: dict[str, tuple[int, str, str]] = {}
        """Session id → (generation, state, desired state) already acted on; skipped until
        one of them changes, so a pass over many settled sessions costs no writes."""
        self._unknown: dict[str, set[str]] = {}
        """Agent id → unknown session ids already reported during its current connection."""
        self._lost_checked: dict[str, datetime | None] = {}
        """Offline agent id → the last heartbeat for which its sessions were marked lost."""
        self._touched: set[str] = set()
        """Sessions to converge on the next pass, which skips the full sweep if not due."""
        self._full_due = True
        self._last_full = 0.0

    def kick(self) -> None:
        """Ask for a full pass over every session as soon as possible, on the leader."""
        if not self.cp.hub.leading():
            self.cp.hub.notify_leader("reconcile")
            return
        self._full_due = True
        super().kick()

    async def run_once(self) -> None:
        """Run one full pass now."""
        self._full_due = True
        await super().run_once()

    def touch(self, session_id: str) -> None:
        """Converge one session soon; a user's change then costs one read, not a sweep."""
        self._touched.add(session_id)
        super().kick()

    # -- the periodic pass ------------------------------------------------------------------

    async def _pass(self) -> None:
        touched, self._touched = self._touched, set()
        due = self._full_due or time.monotonic() - self._last_full >= self.interval_s
        leading = self.cp.hub.leading()
        if not due or not leading:
            for session_id in touched:
                session = await self.cp.store.get_session(session_id)
                if session is not None:
                    await self.converge(session)
        if not due:
            return
        self._full_due, self._last_full = False, time.monotonic()
        now = utcnow()
        agents = await self.cp.store.list_agents()
        await self._sweep_heartbeats(agents, now, leading=leading)
        if not leading:
            return
        await self._mark_lost(agents, now)
        await dispatcher_of(self.cp).reapply_results()
        known = {agent.agent_id for agent in agents}
        seen: set[str] = set()
        for session in await self._sessions():
            seen.add(session.id)
            if session.agent_id is not None and session.agent_id not in known:
                await self._release_orphan(session, session.agent_id)
                continue
            await self.converge(session)
        for session_id in set(self._settled) - seen:
            del self._settled[session_id]
        await self._refresh_gauges(agents)

    async def _sessions(
        self, *, agent_id: str | None = None, states: Sequence[str] | None = None
    ) -> list[Session]:
        found: list[Session] = []
        while True:
            page, total = await self.cp.store.list_sessions(
                agent_id=agent_id, states=states, limit=_PAGE, offset=len(found)
            )
            found.extend(page)
            if not page or len(found) >= total:
                return found

    async def _sweep_heartbeats(
        self, agents: Sequence[AgentRecord], now: datetime, *, leading: bool
    ) -> None:
        """Mark silent agents offline (the leader, for all) and close the sockets of those
        held here (every replica: another cannot close them)."""
        timeout = self.cp.settings.agent_heartbeat_timeout
        reason = f"no heartbeat in {format_duration(timeout)}"
        for agent in agents:
            conn = self.cp.hub.local(agent.agent_id)
            held = conn is not None and conn.conn_id == agent.websocket_conn_id
            if not held and not (leading and agent.status == "online"):
                continue
            silent = agent.last_heartbeat is None or now - agent.last_heartbeat >= timedelta(
                seconds=timeout
            )
            if agent.status == "online":
                if not silent:
                    continue
                if not await self.cp.store.set_agent_offline(
                    agent.agent_id, agent.websocket_conn_id
                ):
                    continue  # it re-registered meanwhile
                logger.warning("Agent %s marked offline: %s", agent.agent_id, reason)
            if held and conn is not None:
                await conn.close(CLOSE_HEARTBEAT_TIMEOUT, reason)

    async def _mark_lost(self, agents: Sequence[AgentRecord], now: datetime) -> None:
        grace = self.cp.settings.lost_grace_period
        for agent in agents:
            if agent.status != "offline":
                self._lost_checked.pop(agent.agent_id, None)
                continue
            since = agent.last_heartbeat
            if since is not None and now - since < timedelta(seconds=grace):
                continue
            if agent.agent_id in self._lost_checked and self._lost_checked[agent.agent_id] == since:
                continue
            detail = f"agent {agent.agent_id} offline for more than {format_duration(grace)}"
            for session in await self._sessions(agent_id=agent.agent_id, states=_HAS_COMPUTE):
                if await self.cp.events.transition(
                    session, "lost", detail, expected_generation=session.generation
                ):
                    logger.warning("Session %s lost: %s", session.id, detail)
            self._lost_checked[agent.agent_id] = since

    async def _refresh_gauges(self, agents: Sequence[AgentRecord]) -> None:
        metrics = self.cp.metrics
        for status in ("online", "offline"):
            metrics.agents.labels(status).set(sum(1 for a in agents if a.status == status))
        for state in _ALL_STATES:
            metrics.sessions.labels(state).set(await self.cp.store.count_sessions(states=[state]))

    # -- converging one session -------------------------------------------------------------

    async def converge(self, session: Session) -> None:
        """Enqueue what brings ``session`` from its actual to its desired state, if anything."""
        key = (session.generation, session.state, session.desired_state)
        if self._settled.get(session.id) == key:
            return
        await self._converge(session)
        self._settled[session.id] = key

    async def _converge(self, session: Session) -> None:
        desired, state = session.desired_state, session.state
        if session.agent_id is None:
            if desired == "stopped":
                await self._settle_stopped(session, "stopped before it was placed")
            return
        if desired == "stopped":
            if state == "stopped" or (state == "failed" and await self._stop_finished(session)):
                await self._forget(session)
            else:
                await self._enqueue(session, "stop")
                if state not in ("stopping", "failed"):
                    await self.cp.events.transition(
                        session, "stopping", "", expected_generation=session.generation
                    )
        elif desired == "hibernated":
            if state in ("starting", "running"):
                await self._enqueue(session, "hibernate")
        elif state == "hibernated":
            await self._enqueue(session, "wake")
        elif state == "scheduled":
            await self._enqueue(session, "start")  # normally queued by the scheduler already
        elif state in ("stopped", "failed") and not await self._commanded(session):
            await self._enqueue(session, "start")

    async def _enqueue(self, session: Session, action: Action) -> None:
        try:
            await dispatcher_of(self.cp).enqueue(session, action)
        except NotFound:
            logger.debug("Session %s was deleted before its %s was queued", session.id, action)

    async def _commanded(self, session: Session) -> bool:
        """Return whether any command was issued for the session's current generation."""
        commands = await self.cp.store.list_commands(session_id=session.id)
        return any(c.generation == session.generation for c in commands)

    async def _stop_finished(self, session: Session) -> bool:
        """Return whether a stop at the current generation ended without stopping it."""
        commands = await self.cp.store.list_commands(
            session_id=session.id, statuses=["failed", "expired"]
        )
        return any(
            c.generation == session.generation and c.command_type == "stop" for c in commands
        )

    async def _settle_stopped(self, session: Session, detail: str) -> None:
        updated: Session | None = session
        if session.state != "stopped":
            updated = await self.cp.events.transition(
                session, "stopped", detail, expected_generation=session.generation
            )
        if updated is not None:
            await self._forget(updated)

    async def _forget(self, session: Session) -> None:
        if session.forget and await self.cp.store.delete_session(session.id):
            self._settled.pop(session.id, None)
            logger.info("Session %s stopped and forgotten", session.id)

    # -- deleted agents ---------------------------------------------------------------------

    async def on_agent_deleted(self, agent_id: str) -> int:
        """Let go of everything placed on an agent that was just deleted.

        Each of its sessions becomes ``stopped``, with desired state ``stopped`` and no
        agent, its reason saying why: a fixed point of :meth:`converge`, so nothing waits
        for an agent that will not answer. Its owner may delete it at once, or ask for it
        to run again, which places it afresh on another agent (a new desktop: what the
        deleted agent's platform held, storage of a hibernated session included, stays
        there for its operator). A session already being deleted is forgotten. If an
        agent of that id connects again later (with a new token) and still runs one of
        them, the session is reported as unknown and left alone, as any other.

        Commands still open for the agent fail, so none reaches it should it come back.

        Returns:
            How many sessions were let go.
        """
        self._unknown.pop(agent_id, None)
        self._lost_checked.pop(agent_id, None)
        store = self.cp.store
        now = utcnow()
        for command in await store.open_commands_before(now):
            if command.agent_id == agent_id:
                await store.finish_command(command.command_id, "failed", None, now)
        reason = f"agent {agent_id} was deleted; start the session again to place it anew"
        released = 0
        for session in await self._sessions(agent_id=agent_id):
            if await self._release(session, agent_id, reason):
                released += 1
        if released:
            logger.warning("Let go of %d session(s) of deleted agent %s", released, agent_id)
            self.cp.scheduler.kick()
        return released

    async def _release(self, session: Session, agent_id: str, reason: str) -> bool:
        current: Session | None = session
        for _ in range(3):  # a concurrent change of the session moves its generation on
            if current is None or current.agent_id != agent_id:
                return False
            fields: dict[str, object] = {"agent_id": None, "platform": None}
            if current.desired_state != "stopped":
                fields["desired_state"] = "stopped"
                fields["generation"] = current.generation + 1
            if current.state == "stopped" and current.desired_state == "stopped":
                updated = await self.cp.store.update_session(
                    current.id, expected_generation=current.generation, **fields
                )
            else:
                updated = await self.cp.events.transition(
                    current, "stopped", reason, expected_generation=current.generation, **fields
                )
            if updated is not None:
                self._settled.pop(updated.id, None)
                if updated.forget and await self.cp.store.delete_session(updated.id):
                    logger.info("Session %s of deleted agent %s forgotten", updated.id, agent_id)
                return True
            current = await self.cp.store.get_session(session.id)
        logger.warning("Session %s kept changing; the next pass lets go of it", session.id)
        return False

    async def _release_orphan(self, session: Session, agent_id: str) -> None:
        """Let go of a session placed on an agent that is gone (deleted by a replica that
        stopped half-way, say); the agent may also have registered since the listing."""
        if await self.cp.store.get_agent(agent_id) is not None:
            return
        reason = f"agent {agent_id} was deleted; start the session again to place it anew"
        if await self._release(session, agent_id, reason):
            logger.warning("Session %s let go: its agent %s no longer exists", session.id, agent_id)

    # -- what agents report -----------------------------------------------------------------

    async def on_agent_registered(self, agent_id: str, reported: Sequence[SessionStatus]) -> None:
        """Take in everything a (re)registered agent reports, then converge its sessions.

        Reported sessions update their actual state (a ``lost`` one the agent still runs is
        ``running`` again); unknown ones are reported; ``running`` or ``lost`` sessions the
        agent no longer has become ``failed``.
        """
        self._unknown.pop(agent_id, None)
        self._lost_checked.pop(agent_id, None)
        reported_ids = {status.session_id for status in reported}
        for status in reported:
            await self._apply_status(agent_id, status)
        for session in await self._sessions(agent_id=agent_id, states=["running", "lost"]):
            if session.id not in reported_ids:
                await self.cp.events.transition(
                    session,
                    "failed",
                    f"agent {agent_id} no longer runs this session",
                    expected_generation=session.generation,
                )
        for session in await self._sessions(agent_id=agent_id, states=sorted(ACTIVE_STATES)):
            await self.converge(session)
        self.cp.scheduler.kick()

    async def on_status(self, agent_id: str, status: SessionStatus) -> None:
        """Take in one ``session.status`` report and converge the session."""
        session = await self._apply_status(agent_id, status)
        if session is not None:
            await self.converge(session)
            if session.state in ("stopped", "failed"):
                self.cp.scheduler.kick()

    async def _apply_status(self, agent_id: str, status: SessionStatus) -> Session | None:
        """Store the reported state if it is about the session's current generation.

        A ``lost`` session takes any report of an earlier generation too: the agent is the
        only one who knows, and the commands of the newer generation follow.
        """
        store = self.cp.store
        session = await store.get_session(status.session_id)
        if session is None or session.agent_id != agent_id:
            await self._report_unknown(agent_id, status, session)
            return None
        current = status.generation == session.generation or (
            session.state == "lost" and status.generation < session.generation
        )
        if status.state not in _REPORTED or not current:
            return session
        metadata = status_metadata(session, status)
        new_detail = bool(status.detail) and status.detail != session.reason
        if status.state == session.state and not new_detail:
            if metadata == session.platform_metadata:
                return session
            updated = await store.update_session(
                session.id, expected_generation=session.generation, platform_metadata=metadata
            )
        else:
            updated = await self.cp.events.transition(
                session,
                status.state,
                status.detail,
                expected_generation=session.generation,
                platform_metadata=metadata,
            )
        return updated if updated is not None else session

    async def _report_unknown(
        self, agent_id: str, status: SessionStatus, session: Session | None
    ) -> None:
        seen = self._unknown.setdefault(agent_id, set())
        if status.session_id in seen:
            return
        seen.add(status.session_id)
        where = "" if session is None else f" (placed on agent {session.agent_id})"
        message = (
            f"unknown session {status.session_id} reported by agent {agent_id}{where}; "
            "left as it is"
        )
        logger.warning(message)
        detail: dict[str, JsonValue] = {"state": status.state, "generation": status.generation}
        if session is not None:
            detail["placed_on"] = session.agent_id
            await self.cp.events.record(session, None, message)
        await audit(
            self.cp, f"agent:{agent_id}", "session.unknown", f"session/{status.session_id}", detail
        )
