"""The ``memory`` hub: the agents connected to this process, in a dict.

Right for one control-plane process (the embedded default). With several replicas an
agent's socket lands on one pod and commands issued on another must be forwarded, which is
what the ``redis`` hub adds.
"""

from __future__ import annotations

from typing import ClassVar

from streamspace_controlplane.hub.base import AgentConnection, Hub
from streamspace_sdk._models import WireModel

__all__ = ["MemoryHub"]


class MemoryHub(Hub):
    """Registry of this process's agent sockets; one current connection per agent id.

    ``attach`` of a second connection for the same agent makes it current and hands the
    old one back to the caller to close; ``detach`` of a connection that is no longer
    current does nothing, so a superseded socket's cleanup cannot remove its successor.
    """

    name: ClassVar[str] = "memory"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: Hub.Settings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self._conns: dict[str, AgentConnection] = {}

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

    async def send(self, agent_id: str, frame: WireModel) -> bool:
        conn = self._conns.get(agent_id)
        if conn is None:
            return False
        try:
            await conn.send(frame)
        except ConnectionError:
            return False
        return True

    def connected(self) -> list[str]:
        return sorted(self._conns)
