"""The hub contract: which replica holds each agent's socket, and what replicas tell each other.

``memory`` is one process: every agent is local, it always leads, and its tickets live in
a dict. ``redis`` (several replicas) records which replica holds each agent, forwards
notices to the holder or the leader, elects the leader, and keeps tickets where every
replica can redeem them.

Notices are hints, never the record of truth: a lost one costs a delay, not a command,
because whoever acts on one reads what to do from the store.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import StreamSpaceError

__all__ = [
    "MAX_TICKETS",
    "AgentConnection",
    "Hub",
    "HubUnavailable",
    "Notice",
    "Replica",
    "Tickets",
]

Notice = Literal["wake", "schedule", "reconcile", "event", "revoke", "lead"]
"""What one replica tells another:

- ``wake`` (to the holder of an agent): its outbox has commands due;
- ``schedule``, ``reconcile`` (to the leader): run a scheduler or reconciler pass;
- ``event`` (to every other replica): a session, the argument, has a new event stored;
- ``revoke`` (to every other replica): end the live access the argument describes;
- ``lead`` (to itself): this replica has just become the leader.
"""

MAX_TICKETS = 100_000
"""Most unexpired tickets a process keeps; past it the oldest go first."""


class HubUnavailable(StreamSpaceError):
    """The hub's backend did not answer a call that needs it (the message says which)."""


class AgentConnection(Protocol):
    """One agent's registered WebSocket, as the hub sees it."""

    @property
    def agent_id(self) -> str:
        """The agent on the other end."""
        ...

    @property
    def conn_id(self) -> str:
        """Unique id of this connection."""
        ...

    @property
    def token_id(self) -> str:
        """Id of the agent token the connection was authenticated with."""
        ...

    async def send(self, frame: WireModel) -> None:
        """Send one text frame; raises ``ConnectionError`` once the socket is gone."""
        ...

    async def send_binary(self, data: bytes) -> None:
        """Send one binary frame."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the socket with a WebSocket close code and reason."""
        ...


@dataclass(frozen=True)
class Replica:
    """A control-plane replica as the others see it."""

    pod: str
    """Its id (``POD_NAME``)."""
    url: str
    """Its base URL for other replicas (``http://10.1.2.3:8080``)."""


NoticeHandler = Callable[[Notice, str], None]
"""Called with a notice and its argument (an agent id for ``wake``, else empty)."""


class Tickets:
    """Short-lived single-use values in this process's memory, bounded in number.

    Args:
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[str, tuple[float, str]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def put(self, key: str, value: str, ttl_s: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl_s`` seconds."""
        now = self._clock()
        for old in [k for k, (until, _) in self._values.items() if until <= now]:
            del self._values[old]
        while len(self._values) >= MAX_TICKETS:
            del self._values[next(iter(self._values))]
        self._values[key] = (now + ttl_s, value)

    def take(self, key: str) -> str | None:
        """Remove and return the value under ``key`` if it has not expired."""
        found = self._values.pop(key, None)
        if found is None or found[0] <= self._clock():
            return None
        return found[1]


class Hub(ABC):
    """Registry of connected agents and the replicas' channel. Register it in
    ``streamspace.hubs``; it is built with the control plane's settings, as stores are.

    Args:
        settings: The control plane's settings (``POD_NAME``, ``REDIS_URL``, ...); read
            from the environment when omitted.
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    """``multi-replica``: agents may be held by other processes, which it reaches."""
    Settings: ClassVar[type[ControlPlaneSettings]] = ControlPlaneSettings
    """What a hub is built with: the control plane's settings (a hub's own variables, such
    as ``REDIS_URL``, are among them)."""

    def __init__(self, settings: ControlPlaneSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.pod = self.settings.pod_name
        """This replica's id (``POD_NAME``)."""
        self.url: str | None = None
        """This replica's base URL for the others; ``None`` for a hub of one process."""
        self._handler: NoticeHandler | None = None

    def on_notice(self, handler: NoticeHandler) -> None:
        """Call ``handler`` for every notice that reaches this replica (one handler)."""
        self._handler = handler

    def _deliver(self, notice: Notice, arg: str = "") -> None:
        if self._handler is not None:
            self._handler(notice, arg)

    async def start(self) -> None:
        """Connect to backends and start background work."""

    async def stop(self) -> None:
        """Stop background work and withdraw this replica; close nothing the caller owns."""

    # -- this process's agents --------------------------------------------------------------

    @abstractmethod
    async def attach(self, conn: AgentConnection) -> AgentConnection | None:
        """Make ``conn`` the agent's current connection in this process.

        Returns:
            The connection it supersedes in this process, which the caller closes.
        """

    @abstractmethod
    async def detach(self, conn: AgentConnection) -> bool:
        """Forget ``conn`` if it is still the agent's current connection; else do nothing."""

    async def refresh(self, conn: AgentConnection) -> None:
        """The agent behind ``conn`` heartbeated: keep its entry alive (where entries expire)."""

    @abstractmethod
    def local(self, agent_id: str) -> AgentConnection | None:
        """Return the agent's connection if it is held by this process."""

    async def send(self, agent_id: str, frame: WireModel) -> bool:
        """Send a frame to the agent if this process holds it; False if it does not or the
        socket is gone."""
        conn = self.local(agent_id)
        if conn is None:
            return False
        try:
            await conn.send(frame)
        except ConnectionError:
            return False
        return True

    @abstractmethod
    def connected(self) -> list[str]:
        """Return the agents connected to this process."""

    # -- the replicas -----------------------------------------------------------------------

    async def locate(self, agent_id: str) -> Replica | None:
        """Return the replica holding the agent's current connection, this one included;
        ``None`` when no replica does.

        Raises:
            HubUnavailable: the backend did not answer.
        """
        if self.local(agent_id) is None:
            return None
        return Replica(self.pod, self.url or "")

    def leading(self) -> bool:
        """Whether this replica runs the cluster-wide passes (scheduler, reconciler sweeps,
        command expiry). One process always does."""
        return True

    def notify_holder(self, agent_id: str, notice: Notice) -> None:
        """Tell the replica holding ``agent_id`` (without waiting; lost if none holds it)."""
        if self.local(agent_id) is not None:
            self._deliver(notice, agent_id)

    def notify_leader(self, notice: Notice) -> None:
        """Tell the leading replica, this one if it leads (without waiting)."""
        self._deliver(notice)

    def notify_all(self, notice: Notice, arg: str) -> None:
        """Tell every other replica (without waiting); a hub of one has none."""

    # -- tickets ----------------------------------------------------------------------------

    @abstractmethod
    async def put_ticket(self, key: str, value: str, ttl_s: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl_s`` seconds where every replica can take it.

        Raises:
            HubUnavailable: the backend did not answer.
        """

    @abstractmethod
    async def take_ticket(self, key: str) -> str | None:
        """Remove and return the value under ``key``: exactly one caller, on any replica,
        gets it, and only before it expires.

        Raises:
            HubUnavailable: the backend did not answer.
        """

    async def problems(self) -> list[str]:
        """Return what keeps this hub from working (for ``/ready``); empty when it works."""
        return []
