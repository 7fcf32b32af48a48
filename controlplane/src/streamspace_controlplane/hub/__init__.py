"""The agent hub: its contract and drivers (``memory``; ``redis`` for several replicas)."""

from __future__ import annotations

from streamspace_controlplane.hub.base import AgentConnection, Hub

__all__ = ["AgentConnection", "Hub"]
