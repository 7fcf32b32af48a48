"""Prometheus metrics of one control-plane process, served at ``/metrics``.

Each process (and each app built in a test) has its own registry, so metrics never leak
between apps.
"""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

__all__ = ["Metrics"]


class Metrics:
    """The control plane's instruments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_open_fds, resident memory, CPU
        Gauge(
            "streamspace_event_loop_tasks",
            "Unfinished asyncio tasks of the serving event loop (a leak shows here first).",
            registry=self.registry,
        ).set_function(_loop_tasks)
        self.agents = Gauge(
            "streamspace_agents", "Agents by status.", ["status"], registry=self.registry
        )
        self.sessions = Gauge(
            "streamspace_sessions", "Sessions by state.", ["state"], registry=self.registry
        )
        self.command_round_trip = Histogram(
            "streamspace_command_round_trip_seconds",
            "From first send of a command to its result.",
            ["action", "outcome"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.commands = Counter(
            "streamspace_commands",
            "Commands finished, by outcome.",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.websockets = Gauge(
            "streamspace_websocket_connections",
            "Open WebSockets by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.frames_refused = Counter(
            "streamspace_frames_refused",
            "Agent frames answered with an error, by code.",
            ["code"],
            registry=self.registry,
        )

        self.vnc_bytes = Counter(
            "streamspace_vnc_bytes",
            "VNC bytes relayed, by session and direction (to_viewer, to_session).",
            ["session_id", "direction"],
            registry=self.registry,
        )
        self.vnc_viewers = Gauge(
            "streamspace_vnc_viewers",
            "Viewers connected to a session's VNC now.",
            ["session_id"],
            registry=self.registry,
        )
        self.vnc_stream_open = Histogram(
            "streamspace_vnc_stream_open_seconds",
            "From a viewer's accepted socket to the agent's stream open to the VNC server.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Return the text exposition format."""
        return generate_latest(self.registry)


def _loop_tasks() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # rendered outside the event loop
        return float("nan")
