"""The agent hub: its contract and drivers (``memory``; ``redis`` for several replicas)."""

from __future__ import annotations

from streamspace_controlplane.hub.base import (
    AgentConnection,
    Hub,
    HubUnavailable,
    Notice,
    Replica,
    Tickets,
)

__all__ = ["AgentConnection", "Hub", "HubUnavailable", "Notice", "Replica", "Tickets"]
