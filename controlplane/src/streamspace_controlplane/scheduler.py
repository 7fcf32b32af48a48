"""The scheduler: places pending sessions on agents that can run them.

A session goes to an online agent whose platform, region and labels match its template and
request and whose capacity is not full; the least loaded wins (fewest active sessions, then
agent id). Placement is one atomic store call, so two passes (or two replicas) never place
a session twice. With no match the session stays ``pending`` with a reason people can read,
recorded as an event when it changes, and is placed by the pass after an agent appears.
With several replicas only the leading one places (the others forward their kicks), so
capacity is counted in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from streamspace_controlplane._loop import KickLoop
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.dispatcher import dispatcher_of
from streamspace_controlplane.models import ACTIVE_STATES, AgentRecord, Session
from streamspace_controlplane.store.base import NotFound

__all__ = ["Placement", "Scheduler", "Want", "choose_agent", "scheduler_of"]

logger = logging.getLogger("streamspace.controlplane.scheduler")

_PAGE = 500
"""Pending sessions looked at per pass; the next pass takes the rest."""

_LISTED_AGENTS = 5
"""Agents described by name in a pending session's reason; the rest are counted."""


def scheduler_of(cp: ControlPlane) -> Scheduler:
    """Return the process's scheduler (built with the control plane)."""
    if not isinstance(cp.scheduler, Scheduler):
        raise RuntimeError("this control plane has no Scheduler; build it with build_control_plane")
    return cp.scheduler


@dataclass(frozen=True)
class Want:
    """What a session needs of an agent."""

    platform: str | None
    """Platform driver, or ``None`` for any."""
    region: str | None
    """Region, or ``None`` for any."""
    labels: dict[str, str]
    """Labels the agent must carry (template's and request's)."""

    @classmethod
    def of(cls, session: Session) -> Want:
        """Return what ``session`` needs: its request over its template."""
        template = session.template_snapshot
        return cls(
            platform=template.platform,
            region=session.region or template.region,
            labels={**template.labels, **session.labels},
        )

    def mismatch(self, agent: AgentRecord) -> str | None:
        """Return why ``agent`` cannot run it, ignoring capacity, or ``None`` if it can."""
        if self.platform is not None and agent.platform != self.platform:
            return "other platform"
        if self.region is not None and agent.region != self.region:
            return "other region"
        missing = [f"{k}={v}" for k, v in self.labels.items() if agent.labels.get(k) != v]
        if missing:
            return "lacks label " + ", ".join(missing)
        return None

    def describe(self) -> str:
        """Return the constraints as words, e.g. `` for platform docker in region eu``."""
        words = ""
        if self.platform is not None:
            words += f" for platform {self.platform}"
        if self.region is not None:
            words += f" in region {self.region}"
        if self.labels:
            words += " with labels " + ", ".join(f"{k}={v}" for k, v in self.labels.items())
        return words


@dataclass(frozen=True)
class Placement:
    """The outcome of choosing an agent: the agent, or why there is none."""

    agent: AgentRecord | None
    reason: str = ""


def choose_agent(want: Want, agents: Sequence[AgentRecord], load: dict[str, int]) -> Placement:
    """Return the least loaded matching agent with room, or the reason there is none.

    Args:
        want: What the session needs.
        agents: The online agents.
        load: Active sessions per agent id.
    """
    best: AgentRecord | None = None
    notes: list[str] = []
    for agent in agents:
        used, room = load.get(agent.agent_id, 0), agent.capacity.max_sessions
        problem = want.mismatch(agent)
        if problem is None and used >= room:
            problem = f"full {used}/{room}"
        if problem is not None:
            notes.append(f"{agent.agent_id} {agent.platform}/{agent.region} {problem}")
            continue
        if best is None or (used, agent.agent_id) < (load.get(best.agent_id, 0), best.agent_id):
            best = agent
    if best is not None:
        return Placement(best)
    if not agents:
        summary = "no agents online"
    else:
        shown = notes[:_LISTED_AGENTS]
        if len(notes) > _LISTED_AGENTS:
            shown.append(f"… and {len(notes) - _LISTED_AGENTS} more")
        count = f"{len(agents)} agent{'s' if len(agents) != 1 else ''} online"
        summary = f"{count}: " + ", ".join(shown)
    return Placement(None, f"no online agent{want.describe()} has room ({summary})")


class Scheduler(KickLoop):
    """Places ``pending`` sessions; runs when kicked and every ``RECONCILE_INTERVAL``.

    Kicked when a session is created, when an agent registers and when capacity frees up.

    Args:
        cp: The control plane.
        interval_s: Seconds between passes when nobody kicks; ``reconcile_interval``.
    """

    def __init__(self, cp: ControlPlane, *, interval_s: float | None = None) -> None:
        super().__init__(
            "scheduler", interval_s if interval_s is not None else cp.settings.reconcile_interval
        )
        self.cp = cp

    def kick(self) -> None:
        """Ask for a pass soon: here if this replica leads, else on the leader."""
        if self.cp.hub.leading():
            super().kick()
        else:
            self.cp.hub.notify_leader("schedule")

    async def _pass(self) -> None:
        if not self.cp.hub.leading():
            return  # one replica places, so two never fill the same agent past capacity
        store = self.cp.store
        sessions, _total = await store.list_sessions(states=["pending"], limit=_PAGE)
        pending = [s for s in reversed(sessions) if s.agent_id is None]  # oldest first
        if not pending:
            return
        agents = await store.list_agents(status="online")
        active = sorted(ACTIVE_STATES)
        load = {
            a.agent_id: await store.count_sessions(agent_id=a.agent_id, states=active)
            for a in agents
        }
        for session in pending:
            if session.desired_state != "running":
                continue  # the reconciler settles sessions stopped before they ran
            await self._place(session, agents, load)

    async def _place(
        self, session: Session, agents: Sequence[AgentRecord], load: dict[str, int]
    ) -> None:
        store = self.cp.store
        placement = choose_agent(Want.of(session), agents, load)
        agent = placement.agent
        if agent is None:
            if placement.reason != session.reason:
                updated = await store.update_session(
                    session.id, expected_generation=session.generation, reason=placement.reason
                )
                if updated is not None and updated.state == "pending":
                    await self.cp.events.record(updated, None, placement.reason)
                    logger.info("Session %s stays pending: %s", session.id, placement.reason)
            return
        if not await store.place_session(session.id, agent.agent_id, agent.platform):
            return  # placed by another pass or replica, or changed meanwhile
        load[agent.agent_id] = load.get(agent.agent_id, 0) + 1
        detail = f"placed on agent {agent.agent_id}"
        placed = await store.update_session(
            session.id, expected_generation=session.generation, reason=detail
        )
        if placed is None:
            return  # changed meanwhile (stopped, deleted): the reconciler takes it from here
        logger.info("Session %s %s", session.id, detail)
        await self.cp.events.record(placed, session.state, detail)
        if placed.desired_state == "running":
            try:
                await dispatcher_of(self.cp).enqueue(placed, "start")
            except NotFound:
                logger.debug("Session %s was deleted before its start was queued", session.id)
