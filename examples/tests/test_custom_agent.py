"""``examples/custom-agent/agent.py`` end to end: run as ``python agent.py`` against a real
control plane, its inline ``pattern`` platform's colour bars are read through ``/vnc/{id}``."""

from __future__ import annotations

import pytest
from conftest import CUSTOM_AGENT, Stack, create_session, create_template, vnc_url, wait_state

from streamspace_sdk.testing import read_screen

pytestmark = pytest.mark.asyncio

BARS = [(255, 255, 255), (255, 255, 0), (0, 255, 255), (0, 255, 0)]
BARS += [(255, 0, 255), (255, 0, 0), (0, 0, 255), (0, 0, 0)]


async def test_custom_agent_serves_its_colour_bars(stack: Stack) -> None:
    admin = await stack.start_control_plane()
    agent = await stack.start_agent("pattern-agent", CUSTOM_AGENT)
    await create_template(admin, "bars", display_name="Colour bars", platform="pattern")
    session_id = await create_session(admin, "bars")
    await wait_state(admin, session_id, "running")
    agents = {a["agent_id"]: a for a in (await admin.get("/api/v1/agents")).json()}
    assert agents["pattern-agent"]["platform"] == "pattern"

    screen = await read_screen(await vnc_url(admin, stack, session_id))
    assert (screen.width, screen.height, screen.name) == (320, 240, f"pattern {session_id}")
    # The viewer asked for red in the lowest byte, the server's own format has it in the
    # third: the bars come out right only if the agent honoured SetPixelFormat.
    for y in (0, 120, 239):
        assert [screen.rgb(40 * i + 20, y) for i in range(8)] == BARS
    assert screen.colours() == set(BARS)

    r = await admin.patch(f"/api/v1/sessions/{session_id}", json={"state": "stopped"})
    assert r.status_code == 200, r.text
    await wait_state(admin, session_id, "stopped")
    agent.check_alive()
