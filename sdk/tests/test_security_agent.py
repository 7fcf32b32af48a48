"""Security regression tests of the agent: what ``streamspace-agent run`` writes to its logs."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator

import pytest
from test_agent import FAST, clean_env, no_plugins, running

from streamspace_sdk import cli
from streamspace_sdk.agent import Agent
from streamspace_sdk.protocol import VncClose, VncOpen
from streamspace_sdk.settings import AgentSettings
from streamspace_sdk.testing import FakeControlPlane, MemoryPlatform, MemoryPlatformState

__all__ = ["clean_env"]

FRAGMENT = 12
"""Characters of a secret that count as leaked when found anywhere (72 random bits)."""


def leaks(secret: str, text: str) -> list[str]:
    """Return the ``FRAGMENT``-character pieces of ``secret`` found in ``text``."""
    size = FRAGMENT
    return [
        secret[i : i + size] for i in range(len(secret) - size + 1) if secret[i : i + size] in text
    ]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def debug_logs() -> Iterator[_Capture]:
    """Every record at DEBUG (``basicConfig`` in ``run`` does nothing under pytest, whose
    handlers the root logger already has, so the level is set here)."""
    capture = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


@pytest.mark.parametrize("transport", ["ws-mux", "ws-dedicated"])
def test_agent_run_keeps_its_token_stream_tokens_and_vnc_bytes_out_of_debug_logs(
    monkeypatch: pytest.MonkeyPatch, debug_logs: _Capture, transport: str
) -> None:
    """Token leakage through DEBUG wire traces, and session contents in logs.

    ``streamspace-agent run`` with ``LOG_LEVEL=DEBUG`` connects (its token in the
    handshake), starts a session and serves a viewer's stream on each transport (a
    ``vnc.open`` carrying a stream token and, on ``ws-dedicated``, a dial whose path is
    that token; on ``ws-mux``, the VNC server's bytes in frames). Its logs trace the
    handshake and the frames, but hold no fragment of the agent token, the stream token
    or the VNC bytes (the RFB banner stands for what a user types).
    """
    token = f"ssa_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    stream_token = secrets.token_urlsafe(32)
    for name, value in {
        "AGENT_ID": "agent-1",
        "CONTROL_PLANE_URL": "ws://127.0.0.1:9",  # replaced by the fake's below
        "AGENT_TOKEN": token,
        "LOG_LEVEL": "DEBUG",
        "VNC_TRANSPORT": transport,
        "HEALTH_PORT": "0",
    }.items():
        monkeypatch.setenv(name, value)
    closed: list[VncClose] = []

    async def serve_one_viewer(settings: AgentSettings) -> None:
        state = MemoryPlatformState()
        async with FakeControlPlane(token=token, agent_id="agent-1") as fake:
            agent = Agent(
                settings.model_copy(update={"control_plane_url": fake.url}),
                MemoryPlatform(agent_id="agent-1", state=state),
                hooks=no_plugins(),
                backoff=FAST,
            )
            async with running(agent):
                conn = await fake.wait_registered()
                await fake.command("start", "s1")
                await fake.wait_for(lambda: "s1" in state.sessions)
                await fake.send(
                    VncOpen(
                        stream_id=3,
                        session_id="s1",
                        transport=transport,
                        stream_token=stream_token if transport == "ws-dedicated" else None,
                    )
                )
                closed.append(await fake.next_frame(VncClose))
                if transport == "ws-mux":
                    await fake.wait_for(lambda: conn.bad_frames)  # the banner's frame
        await state.close()

    class ScriptedAgent:
        """Stands in for the agent ``run`` builds: the same settings, a memory platform."""

        def __init__(self, settings: AgentSettings) -> None:
            self.settings = settings

        def run(self) -> None:
            asyncio.run(serve_one_viewer(self.settings))

    monkeypatch.setattr(cli, "Agent", ScriptedAgent)
    assert cli.main(["run"]) == 0
    assert closed
    if transport == "ws-dedicated":
        assert "HTTP 404" in closed[0].reason  # it dialled; the fake has no stream route

    # The control plane's side of the sockets (the fake's server) is not the agent's.
    logged = "\n".join(
        line for line in debug_logs.lines if not line.startswith("websockets.server")
    )
    assert "> GET /api/v1/agents/connect HTTP/1.1" in logged  # the traces were captured
    assert "< TEXT" in logged
    kept = {"agent token": token.split("_", 2)[2], "stream token": stream_token}
    kept["VNC bytes"] = "RFB 003.008"
    kept["VNC bytes (hex)"] = "52 46 42 20 30 30 33 2e 30 30 38"
    lines = [line for line in logged.splitlines() if any(leaks(s, line) for s in kept.values())]
    assert not lines, "\n".join(lines[:20])
