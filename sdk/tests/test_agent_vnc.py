"""The agent's VNC relay against the FakeControlPlane: ``vnc.open`` → TCP → bytes → close."""

from __future__ import annotations

import logging

import pytest
from test_agent import clean_env, make_agent, running

from streamspace_sdk.protocol import VncClose, VncOpen, VncOpened, decode_data
from streamspace_sdk.testing import FakeControlPlane, MemoryPlatform, MemoryPlatformState

__all__ = ["clean_env"]


def vnc_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The agent's log lines about VNC tunnels, in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamspace.agent.vnc" and "VNC tunnel" in r.getMessage()
    ]


@pytest.mark.asyncio
async def test_vnc_open_relays_the_banner_and_closes_when_the_server_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The MemoryPlatform's VNC server sends the RFB banner and hangs up. The tunnel is
    logged at INFO as the seed guide has operators grep for, ``VNC tunnel initialized for
    session <id>``, and again when it closes, with the bytes relayed."""
    caplog.set_level(logging.INFO, logger="streamspace.agent")
    state = MemoryPlatformState()
    async with FakeControlPlane() as fake:
        agent = make_agent(fake, MemoryPlatform(agent_id="agent-1", state=state))
        async with running(agent):
            conn = await fake.wait_registered()
            await fake.command("start", "s1")
            await fake.wait_for(lambda: "s1" in state.sessions)
            endpoint = await agent.platform.vnc_endpoint("s1")
            await fake.send(VncOpen(stream_id=3, session_id="s1"))
            opened = await fake.next_frame(VncOpened)
            closed = await fake.next_frame(VncClose)
            await fake.wait_for(lambda: conn.bad_frames)
    await state.close()
    assert opened.stream_id == closed.stream_id == 3
    data = b""
    for frame in conn.bad_frames:
        assert isinstance(frame, bytes)
        stream_id, payload = decode_data(frame)
        assert stream_id == 3
        data += payload
    assert data == b"RFB 003.008\n"
    assert agent.vnc_streams_requested == 1
    assert agent.vnc_streams_open == 0
    tunnel = vnc_lines(caplog)
    assert tunnel[0] == (
        "VNC tunnel initialized for session s1 "
        f"(stream 3, ws-mux, VNC server {endpoint.host}:{endpoint.port})"
    )
    assert len(tunnel) == 2
    assert tunnel[1].startswith("VNC tunnel closed for session s1 (stream 3, after ")
    assert tunnel[1].endswith("s, 12 bytes to the viewer, 0 to the VNC server)")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (VncOpen(stream_id=4, session_id="s-unknown"), "not running"),
        (VncOpen(stream_id=5, session_id="s1", transport="ws-dedicated"), "ws-dedicated"),
    ],
)
async def test_vnc_open_that_cannot_be_served_is_closed_with_a_reason(
    request_: VncOpen, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamspace.agent")
    async with FakeControlPlane() as fake:
        agent = make_agent(fake)
        async with running(agent):
            await fake.wait_registered()
            await fake.command("start", "s1")
            await fake.send(request_)
            closed = await fake.next_frame(VncClose)
    assert closed.stream_id == request_.stream_id
    assert reason in closed.reason
    assert not fake.frames_of(VncOpened)
    assert vnc_lines(caplog) == [], "a refused stream is no tunnel"
    assert any(
        r.levelno == logging.WARNING and f"Refused VNC stream {request_.stream_id}" in r.message
        for r in caplog.records
    )
