"""The ``memory`` hub: the agents connected to this process, in a dict.

Right for one control-plane process (the embedded default): every agent is local, the
process always leads, and tickets live in its memory. With several replicas an agent's
socket lands on one pod while requests land on any, which is what the ``redis`` hub adds.
"""

from __future__ import annotations

from typing import ClassVar

from streamspace_controlplane.hub.base import AgentConnection, Hub, Tickets
from streamspace_controlplane.settings import ControlPlaneSettings

__all__ = ["MemoryHub"]


class MemoryHub(Hub):
    """Registry of this process's agent sockets; one current connection per agent id.

    ``attach`` of a second connection for the same agent makes it current and hands the
    old one back to the caller to close; ``detach`` of a connection that is no longer
    current does nothing, so a superseded socket's cleanup cannot remove its successor.
    """

    name: ClassVar[str] = "memory"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: ControlPlaneSettings | None = None) -> None:
        super().__init__(settings)
        self._conns: dict[str, AgentConnection] = {}
        self.tickets = Tickets()
        """The tickets of this process."""

    async def attach(self, conn: AgentConnection) -> AgentConnection | None:
        old = self._conns.get(conn.agent_id)
        self._conns[conn.agent_id] = conn
        return None if old is None or old is conn else old

    async def detach(self, conn: AgentConnection) -> bool:
        if self._conns.get(conn.agent_id) is conn:
            del self._conns[conn.agent_id]
            return True
        return False

    def local(self, agent_id: str) -> AgentConnection | None:
        return self._conns.get(agent_id)

    def connected(self) -> list[str]:
        return sorted(self._conns)

    async def put_ticket(self, key: str, value: str, ttl_s: float) -> None:
        self.tickets.put(key, value, ttl_s)

    async def take_ticket(self, key: str) -> str | None:
        return self.tickets.take(key)
