"""The agent runtime: what ``streamspace-agent run`` runs, and what a custom agent embeds.

A complete agent is three lines::

    from streamspace_sdk import Agent, AgentSettings, load_settings

    Agent(load_settings(AgentSettings), platform=MyPlatform(agent_id="host-1")).run()

See :class:`Agent` for what it does, and :class:`Backoff` for the waits between
connection attempts.
"""

from __future__ import annotations

from streamspace_sdk.agent._backoff import Backoff
from streamspace_sdk.agent._runtime import AGENT_PATH, Agent, agent_url, event_loop_factory

__all__ = ["AGENT_PATH", "Agent", "Backoff", "agent_url", "event_loop_factory"]
