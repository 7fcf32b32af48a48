"""What every service shares: the process's settings, store, hub, hooks, and session events.

Routes reach it as ``request.app.state.cp``. Services receive it when built.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

from streamspace_controlplane.hub.base import Hub
from streamspace_controlplane.metrics import Metrics
from streamspace_controlplane.models import Session, SessionEventRecord, utcnow
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store.base import Store
from streamspace_sdk.hooks import Hooks, SessionEvent
from streamspace_sdk.platform import SessionState

__all__ = ["Background", "ControlPlane", "Converger", "Kick", "SessionEvents"]

logger = logging.getLogger("streamspace.controlplane")


class Kick(Protocol):
    """Something that runs soon when kicked (the scheduler, the reconciler)."""

    def kick(self) -> None:
        """Ask for a run as soon as possible; never blocks."""
        ...


class Background(Protocol):
    """A loop that runs for the life of the app."""

    async def start(self) -> None:
        """Start the loop's task."""
        ...

    async def stop(self) -> None:
        """Stop it and wait for it to finish."""
        ...


class Converger(Kick, Protocol):
    """The reconciler: kicked for a full pass, or touched for one session."""

    def touch(self, session_id: str) -> None:
        """Converge this one session soon, without a pass over every session."""
        ...


class _NoKick:
    def kick(self) -> None:
        return None

    def touch(self, session_id: str) -> None:
        return None


class SessionEvents:
    """Session state changes: stored as events, streamed to subscribers, sent to hooks.

    Subscribers of this process get each event it records; with several replicas the hub
    tells the others, whose subscribers get ``None``: a nudge to read the store.
    """

    def __init__(self, store: Store, hooks: Hooks, hub: Hub | None = None) -> None:
        self._store = store
        self._hooks = hooks
        self._hub = hub
        self._subscribers: dict[str, set[asyncio.Queue[SessionEventRecord | None]]] = defaultdict(
            set
        )

    async def transition(
        self,
        session: Session,
        state: SessionState,
        detail: str = "",
        *,
        expected_generation: int | None = None,
        **fields: Any,
    ) -> Session | None:
        """Move a session to ``state`` (and set ``fields``), recording the event.

        Returns:
            The updated session, or ``None`` if it is gone or (with ``expected_generation``)
            a concurrent change won.
        """
        updated = await self._store.update_session(
            session.id,
            expected_generation=expected_generation,
            state=state,
            reason=detail if state != session.state or detail else session.reason,
            **fields,
        )
        if updated is None:
            return None
        if state != session.state or detail:
            await self.record(updated, session.state if state != session.state else None, detail)
        return updated

    async def record(
        self, session: Session, previous: SessionState | None, detail: str = ""
    ) -> SessionEventRecord:
        """Store and publish an event for ``session``'s current state."""
        event = await self._store.add_session_event(
            SessionEventRecord(
                session_id=session.id,
                state=session.state,
                previous_state=previous,
                detail=detail,
                at=utcnow(),
            )
        )
        for queue in list(self._subscribers.get(session.id, ())):
            if queue.qsize() < 1000:  # a stalled reader loses live events, not the store's
                queue.put_nowait(event)
        if self._hub is not None:
            self._hub.notify_all("event", session.id)
        await self._hooks.session_event(
            SessionEvent(
                session_id=session.id,
                state=event.state,
                previous_state=previous,
                detail=detail,
                agent_id=session.agent_id,
                at=event.at,
            )
        )
        return event

    def subscribe(self, session_id: str) -> asyncio.Queue[SessionEventRecord | None]:
        """Return a queue that receives the session's new events until ``unsubscribe``, and
        ``None`` when another replica recorded one (read the store for it)."""
        queue: asyncio.Queue[SessionEventRecord | None] = asyncio.Queue()
        self._subscribers[session_id].add(queue)
        return queue

    def poke(self, session_id: str) -> None:
        """Another replica recorded an event of the session: nudge its subscribers here."""
        for queue in list(self._subscribers.get(session_id, ())):
            if queue.empty():  # one nudge is enough: the reader reads every new event
                queue.put_nowait(None)

    def unsubscribe(self, session_id: str, queue: asyncio.Queue[SessionEventRecord | None]) -> None:
        """Stop delivering to ``queue``."""
        queues = self._subscribers.get(session_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[session_id]


@dataclass
class ControlPlane:
    """The shared parts of one control-plane process."""

    settings: ControlPlaneSettings
    store: Store
    hub: Hub
    hooks: Hooks
    jwt_secret: str
    events: SessionEvents
    metrics: Metrics = field(default_factory=Metrics)
    scheduler: Kick = field(default_factory=_NoKick)
    """Places pending sessions; kicked when a session is created or an agent registers."""
    reconciler: Converger = field(default_factory=_NoKick)
    """Converges desired and actual state; kicked when a desired state changes."""
    background: list[Background] = field(default_factory=list)
    """Loops started with the app and stopped, in reverse order, with it."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Parts added by later features (the VNC proxy, metrics) keyed by name."""
