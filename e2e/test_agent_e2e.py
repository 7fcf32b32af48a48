"""Issue 4, end to end: a real control plane, real agent processes, real Xvnc sessions."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from conftest import (
    AGENT_ID,
    Agent,
    Agents,
    ControlPlane,
    EventWatch,
    create_session,
    eventually,
    get_session,
    group_alive,
    record,
    records,
    rfb_banner,
    xvnc_pid,
)

pytestmark = pytest.mark.asyncio

RFB_BANNER = b"RFB 003.008\n"
NEVER = ("stopping", "stopped", "failed")
"""States a session that merely changed agent processes must never pass through."""


async def agent_row(admin: httpx.AsyncClient, agent_id: str = AGENT_ID) -> dict[str, Any]:
    r = await admin.get(f"/api/v1/agents/{agent_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def heartbeat_after(admin: httpx.AsyncClient, moment: datetime) -> None:
    """Wait until the control plane has handled a heartbeat the agent sent after ``moment``.

    Registering sets ``last_heartbeat`` too, so this waits for a second, later value: a
    heartbeat frame. The control plane takes in the sessions of the hello before it reads
    the connection's frames, and the agent sends its first status poll before its first
    heartbeat, so by then everything the agent reported on registering has been handled.
    """
    seen: set[datetime] = set()

    async def beaten() -> bool:
        row = await agent_row(admin)
        if row["status"] == "online" and row["last_heartbeat"] is not None:
            last = datetime.fromisoformat(row["last_heartbeat"])
            if last > moment:
                seen.add(last)
        return len(seen) >= 2

    await eventually(beaten, f"a heartbeat of {AGENT_ID} after {moment.isoformat()}")


async def watching(
    stack: contextlib.AsyncExitStack, admin: httpx.AsyncClient, ids: list[str]
) -> list[EventWatch]:
    """Follow the event streams of ``ids`` until ``stack`` closes."""
    return [await stack.enter_async_context(EventWatch(admin, sid)) for sid in ids]


async def start_running(admin: httpx.AsyncClient, count: int) -> list[str]:
    """Create ``count`` sessions over REST and wait until each is ``running``."""
    ids = [await create_session(admin) for _ in range(count)]
    for sid in ids:
        async with EventWatch(admin, sid) as watch:
            await watch.wait_for("running")
    return ids


async def test_session_runs_a_real_desktop_and_stop_ends_its_process_group(
    admin: httpx.AsyncClient, agent: Agent
) -> None:
    sid = await create_session(admin)
    async with EventWatch(admin, sid) as watch:
        await watch.wait_for("running")
        session = await get_session(admin, sid)
        assert (session["state"], session["agent_id"]) == ("running", AGENT_ID)
        rec = record(agent.state_dir, sid)
        assert rec["state"] == "running"
        assert rec["pgid"] == rec["pid"]
        assert group_alive(rec["pgid"])
        assert await rfb_banner(rec["vnc_port"]) == RFB_BANNER

        r = await admin.patch(f"/api/v1/sessions/{sid}", json={"state": "stopped"})
        assert r.status_code == 200, r.text
        await watch.wait_for("stopped")

    assert watch.states[-2:] == ["stopping", "stopped"], watch.history()
    assert "running" in watch.states, watch.history()
    assert "failed" not in watch.states, watch.history()
    # The agent reports `stopped` only once the whole group is gone.
    with pytest.raises(ProcessLookupError):
        os.killpg(rec["pgid"], 0)
    assert sid not in records(agent.state_dir)
    with pytest.raises(ConnectionRefusedError):
        await rfb_banner(rec["vnc_port"], timeout_s=1)


async def test_agent_sigkill_then_new_process_adopts_every_session(
    admin: httpx.AsyncClient, agents: Agents, agent: Agent
) -> None:
    ids = await start_running(admin, 2)
    before = {sid: record(agent.state_dir, sid) for sid in ids}
    xvnc = {sid: xvnc_pid(rec["pgid"]) for sid, rec in before.items()}
    async with contextlib.AsyncExitStack() as stack:
        watches = await watching(stack, admin, ids)
        for watch in watches:
            await watch.wait_for("running")
        agent.kill()
        for rec in before.values():
            assert group_alive(rec["pgid"]), "a session died with its agent"

        restarted_at = datetime.now(UTC)
        new = await agents.restart(agent)  # same AGENT_ID, same PROCESS_STATE_DIR
        await heartbeat_after(admin, restarted_at)

        for sid, rec in before.items():
            session = await get_session(admin, sid)
            assert (session["state"], session["agent_id"]) == ("running", AGENT_ID), session
            now = record(new.state_dir, sid)
            assert (now["pgid"], now["vnc_port"]) == (rec["pgid"], rec["vnc_port"])
            assert xvnc_pid(rec["pgid"]) == xvnc[sid], "Xvnc was started again"
            assert await rfb_banner(rec["vnc_port"]) == RFB_BANNER

        # Adopted means controlled: the new process stops a session it did not start.
        first, second = ids
        r = await admin.patch(f"/api/v1/sessions/{first}", json={"state": "stopped"})
        assert r.status_code == 200, r.text
        await watches[0].wait_for("stopped")
        assert not group_alive(before[first]["pgid"])
        assert xvnc_pid(before[second]["pgid"]) == xvnc[second]

    restart = watches[0].states[: watches[0].states.index("stopping")]
    for history in (restart, watches[1].states):
        assert not set(history) & set(NEVER), (watches[0].history(), watches[1].history())
    assert watches[1].state == "running"


async def test_control_plane_restart_agent_reconnects_and_nothing_is_lost(
    cp: ControlPlane, admin: httpx.AsyncClient, agent: Agent
) -> None:
    ids = await start_running(admin, 2)
    before = {sid: record(agent.state_dir, sid) for sid in ids}
    first_connection = (await agent.wait_ready())["connection_id"]
    async with contextlib.AsyncExitStack() as stack:
        watches = await watching(stack, admin, ids)
        for watch in watches:
            await watch.wait_for("running")
        cp.kill()
        await cp.start()  # same port, same STREAMSPACE_HOME

        async def reconnected() -> bool:
            status, body = await agent.readiness()
            return status == 200 and body.get("connection_id") != first_connection

        await eventually(reconnected, "the agent to reconnect by itself", timeout_s=30)
        await heartbeat_after(admin, datetime.now(UTC))
        for sid, rec in before.items():
            session = await get_session(admin, sid)
            assert (session["state"], session["agent_id"]) == ("running", AGENT_ID), session
            assert record(agent.state_dir, sid)["pgid"] == rec["pgid"]
            assert await rfb_banner(rec["vnc_port"]) == RFB_BANNER
        for watch in watches:
            await watch.wait_for("running")
    for watch in watches:
        assert watch.reconnects >= 1  # the stream did span the restart
        assert not set(watch.states) & set(NEVER), watch.history()
    assert agent.proc is not None
    assert agent.proc.poll() is None, "the agent process restarted"
    assert "Reconnecting to the control plane" in agent.log_text()

    (new,) = await start_running(admin, 1)
    assert record(agent.state_dir, new)["state"] == "running"


async def test_control_plane_killed_mid_command_applies_it_once_after_restart(
    cp: ControlPlane, admin: httpx.AsyncClient, agent: Agent
) -> None:
    """kill -9 right after a stop and a start are issued: whatever the control plane had
    sent, acknowledged or recorded, after its restart each command has taken effect once."""
    (to_stop,) = await start_running(admin, 1)
    stopped_pgid = int(record(agent.state_dir, to_stop)["pgid"])
    r = await admin.patch(f"/api/v1/sessions/{to_stop}", json={"state": "stopped"})
    assert r.status_code == 200, r.text
    to_start = await create_session(admin)
    cp.kill()
    await cp.start()
    async with EventWatch(admin, to_stop) as watch:
        await watch.wait_for("stopped", timeout_s=30)
    async with EventWatch(admin, to_start) as watch:
        await watch.wait_for("running", timeout_s=30)
    assert not group_alive(stopped_pgid)
    started = record(agent.state_dir, to_start)
    assert group_alive(int(started["pgid"]))
    assert xvnc_pid(int(started["pgid"])) > 0  # one Xvnc: started once
    r = await admin.get(f"/api/v1/sessions/{to_start}")
    assert r.json()["generation"] == 1


REFUSED = "Registration refused (4429"
"""What an agent process logs when the control plane refuses it as a second process."""


async def registered_or_refused(agent: Agent, refusals: int = 1) -> bool:
    """Wait until ``agent`` registers (True) or has been refused ``refusals`` times (False)."""
    outcome: bool | None = None

    async def settled() -> bool:
        nonlocal outcome
        if (await agent.readiness())[0] == 200:
            outcome = True
        elif agent.log_text().count(REFUSED) >= refusals:
            outcome = False
        return outcome is not None

    await eventually(settled, f"agent {agent.name} to register or be refused", timeout_s=45)
    assert outcome is not None
    return outcome


async def test_second_process_with_the_same_agent_id_is_refused(
    admin: httpx.AsyncClient, agents: Agents, agent: Agent
) -> None:
    (first,) = await start_running(admin, 1)
    connection = (await agent.wait_ready())["connection_id"]
    instance = (await agent_row(admin))["metadata"]["instance_id"]
    async with EventWatch(admin, first) as watch:
        await watch.wait_for("running")
        # HA off, same AGENT_ID, a PROCESS_STATE_DIR of its own (as on another host).
        second = await agents.start(ready=False)
        assert not await registered_or_refused(second)

        async def says_why() -> bool:
            status, body = await second.readiness()
            assert status == 503, body
            return "another process with this AGENT_ID is connected" in body["reason"]

        await eventually(says_why, "the refused process's /ready to say why")

        # The first process keeps its connection and its sessions; nothing was superseded.
        status, body = await agent.readiness()
        assert (status, body["connection_id"]) == (200, connection), body
        assert "superseded" not in agent.log_text().lower()
        row = await agent_row(admin)
        assert (row["status"], row["metadata"]["instance_id"]) == ("online", instance), row

        # The control plane goes on placing sessions on, and talking to, the first only.
        (placed,) = await start_running(admin, 1)
        assert set(records(agent.state_dir)) == {first, placed}
        assert records(second.state_dir) == {}
        pgid = record(agent.state_dir, first)["pgid"]
        r = await admin.patch(f"/api/v1/sessions/{first}", json={"state": "stopped"})
        assert r.status_code == 200, r.text
        await watch.wait_for("stopped")
        assert not group_alive(pgid)
        assert (await agent.readiness())[1].get("connection_id") == connection
    until_stop = watch.states[: watch.states.index("stopping")]
    assert not set(until_stop) & {*NEVER, "lost"}, watch.history()


async def test_second_process_taking_over_never_strands_the_first_ones_sessions(
    admin: httpx.AsyncClient, agents: Agents, agent: Agent
) -> None:
    (sid,) = await start_running(admin, 1)
    pgid = record(agent.state_dir, sid)["pgid"]
    async with EventWatch(admin, sid) as watch:
        second = await agents.start(ready=False)
        assert not await registered_or_refused(second)
        # The first process goes away for a while (maintenance, a slow redeploy): by design
        # its sessions keep running, for it to adopt when it is back. Meanwhile the second
        # one retries, 30 s after its refusal, and is refused again: the session lives where
        # the first one ran.
        agent.stop()
        assert group_alive(pgid)
        await registered_or_refused(second, refusals=2)
        back = await agents.restart(agent, ready=False)  # same state dir: it has the session
        back_registered = await registered_or_refused(back)
        if back_registered:
            await watch.wait_for("running", fail_on=())
        before_stop, history = list(watch.states), watch.history()
        r = await admin.patch(f"/api/v1/sessions/{sid}", json={"state": "stopped"})
        assert r.status_code == 200, r.text
        await watch.wait_for("stopped", fail_on=())
        assert not group_alive(pgid), (
            f"the control plane says stopped, but the desktop (process group {pgid}) runs on; "
            f"the first process was {'let in' if back_registered else 'refused'}; the session "
            f"went: {history}"
        )
    assert back_registered, history
    assert records(second.state_dir) == {}
    assert not set(before_stop) & set(NEVER), history
