"""The agent's VNC relay against the FakeControlPlane: ``vnc.open`` → TCP → bytes → close."""

from __future__ import annotations

import pytest
from test_agent import clean_env, make_agent, running

from streamspace_sdk.protocol import VncClose, VncOpen, VncOpened, decode_data
from streamspace_sdk.testing import FakeControlPlane, MemoryPlatform, MemoryPlatformState

__all__ = ["clean_env"]


@pytest.mark.asyncio
async def test_vnc_open_relays_the_banner_and_closes_when_the_server_does() -> None:
    """The MemoryPlatform's VNC server sends the RFB banner and hangs up."""
    state = MemoryPlatformState()
    async with FakeControlPlane() as fake:
        agent = make_agent(fake, MemoryPlatform(agent_id="agent-1", state=state))
        async with running(agent):
            conn = await fake.wait_registered()
            await fake.command("start", "s1")
            await fake.wait_for(lambda: "s1" in state.sessions)
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


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (VncOpen(stream_id=4, session_id="s-unknown"), "not running"),
        (VncOpen(stream_id=5, session_id="s1", transport="ws-dedicated"), "ws-dedicated"),
    ],
)
async def test_vnc_open_that_cannot_be_served_is_closed_with_a_reason(
    request_: VncOpen, reason: str
) -> None:
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
