"""The hub contract: which agent sockets are connected, and delivering frames to them.

``memory`` keeps the registry in this process. ``redis`` (several replicas) also records
which pod holds each agent and forwards frames to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

from streamspace_sdk._models import WireModel
from streamspace_sdk.settings import StreamSpaceSettings

__all__ = ["AgentConnection", "Hub"]


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

    async def send(self, frame: WireModel) -> None:
        """Send one text frame; raises ``ConnectionError`` once the socket is gone."""
        ...

    async def send_binary(self, data: bytes) -> None:
        """Send one binary frame."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the socket with a WebSocket close code and reason."""
        ...


class Hub(ABC):
    """Registry of connected agents. Register it in ``streamspace.hubs``."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()

    class Settings(StreamSpaceSettings):
        """The driver's own settings."""

    async def start(self) -> None:
        """Connect to backends and start background work."""

    async def stop(self) -> None:
        """Stop background work; close nothing the caller owns."""

    @abstractmethod
    async def attach(self, conn: AgentConnection) -> AgentConnection | None:
        """Make ``conn`` the agent's current connection.

        Returns:
            The connection it supersedes in this process, which the caller closes.
        """

    @abstractmethod
    async def detach(self, conn: AgentConnection) -> bool:
        """Forget ``conn`` if it is still the agent's current connection; else do nothing."""

    @abstractmethod
    def local(self, agent_id: str) -> AgentConnection | None:
        """Return the agent's connection if it is held by this process."""

    @abstractmethod
    async def send(self, agent_id: str, frame: WireModel) -> bool:
        """Deliver a frame to the agent wherever it is connected; False if it is not."""

    @abstractmethod
    def connected(self) -> list[str]:
        """Return the agents connected to this process."""
