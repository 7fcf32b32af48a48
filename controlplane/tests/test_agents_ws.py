"""The agent WebSocket, over real sockets: registration, the outbox, refusals, heartbeats.

Every test serves the real app with uvicorn on a free port and plays agents with
:class:`agentsim.AgentSim`, which speaks the SDK's protocol models over a ``websockets``
client connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentsim import AgentSim, Closed, Harness, Refused, eventually, fast_settings
from agentsim import serve_control_plane as served
from websockets.exceptions import ConnectionClosed

from streamspace_controlplane.models import utcnow
from streamspace_controlplane.services import sessions as session_service
from streamspace_controlplane.store.base import Store, StoreError
from streamspace_sdk.hooks import Principal
from streamspace_sdk.platform import SessionSpec
from streamspace_sdk.protocol import Command, CommandAck, Heartbeat, dump_frame

ALICE = Principal(username="alice", role="user")


def sample(harness: Harness, name: str, **labels: str) -> float | None:
    return harness.cp.metrics.registry.get_sample_value(name, labels)


def agent_sockets(harness: Harness) -> float:
    return sample(harness, "streamspace_websocket_connections", kind="agent") or 0.0


@pytest.mark.asyncio
async def test_register_place_deliver_ack_result_running(harness: Harness) -> None:
    """A session is placed on the registered agent, started, acknowledged and running."""
    store = harness.cp.store
    sim = await harness.agent("a1", labels={"zone": "z1", "tier": "gold"})
    assert sim.welcome is not None
    assert sim.welcome.heartbeat_interval_s == pytest.approx(1.0)  # 3s timeout / 3
    agent = await store.get_agent("a1")
    assert agent is not None
    assert agent.status == "online"
    assert agent.websocket_conn_id == sim.welcome.connection_id
    assert agent.metadata["agent_version"] == "agentsim"
    assert agent_sockets(harness) == 1

    await harness.template(env={"LANG": "C"}, vnc_port=5901, labels={"zone": "z1"})
    session = await harness.session(labels={"tier": "gold"})
    running = await harness.wait_state(session.id, "running")

    assert running.agent_id == "a1"
    assert running.platform == "memory"
    assert running.reason == ""
    [command] = sim.commands
    assert command.action == "start"
    assert command.generation == 1
    assert command.spec == SessionSpec(
        session_id=session.id,
        generation=1,
        user="alice",
        template="desktop",
        image="example/desktop:1",
        vnc_port=5901,
        env={"LANG": "C"},
        labels={"zone": "z1", "tier": "gold"},
    )
    [row] = await store.list_commands(session_id=session.id)
    assert (row.command_id, row.status, row.attempts) == (command.command_id, "completed", 1)
    assert row.acked_at is not None
    assert row.result is not None
    assert row.result["ok"] is True
    states = [e.state for e in await store.list_session_events(session.id)]
    assert states[-3:] == ["scheduled", "starting", "running"]
    assert states[0] == "pending"
    count = "streamspace_command_round_trip_seconds_count"
    assert sample(harness, count, action="start", outcome="completed") == 1
    assert sim.state.sessions[session.id].state == "running"


@pytest.mark.asyncio
async def test_seed_path_agent_ws_works(harness: Harness) -> None:
    """``/agent/ws``, the path of the seed's Helm values, is the same endpoint."""
    sim = await harness.agent("a1", path="/agent/ws")
    assert sim.welcome is not None
    agent = await harness.cp.store.get_agent("a1")
    assert agent is not None
    assert agent.status == "online"


@pytest.mark.asyncio
async def test_seed_troubleshooting_path_agents_hub_works(harness: Harness) -> None:
    """``/api/v1/agents/hub``, the path the seed's troubleshooting checks, is the same
    endpoint: an agent registers there, is online and is sent its commands."""
    sim = await harness.agent("a1", path="/api/v1/agents/hub")
    assert sim.welcome is not None
    agent = await harness.cp.store.get_agent("a1")
    assert agent is not None
    assert (agent.status, agent.websocket_conn_id) == ("online", sim.welcome.connection_id)
    await harness.template()
    session = await harness.session()
    running = await harness.wait_state(session.id, "running")
    assert running.agent_id == "a1"
    assert [c.action for c in sim.commands] == ["start"]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/api/v1/agents/connect", "/agent/ws", "/api/v1/agents/hub"])
async def test_every_agent_path_refuses_an_upgrade_without_a_token(
    harness: Harness, path: str
) -> None:
    """No token, no socket, on each agent path alike: HTTP 401 before the handshake."""
    sim = AgentSim(harness.url, None, "a1", path=path)
    with pytest.raises(Refused) as refused:
        await sim.connect()
    assert refused.value.code == 401
    assert '"code": "unauthorized"' in refused.value.reason
    assert await harness.cp.store.get_agent("a1") is None


@pytest.mark.asyncio
async def test_command_sent_while_agent_away_is_delivered_when_it_returns(
    store: Store, tmp_path: Path
) -> None:
    """A command for an offline agent waits in the outbox and is sent when it registers."""
    # A long grace period keeps the session "running" (not "lost") while the agent is away.
    async with served(fast_settings(tmp_path, lost_grace_period="1h"), store) as harness:
        sim = await harness.agent("a1")
        await harness.template()
        session = await harness.session()
        await harness.wait_state(session.id, "running")
        host = sim.state
        await sim.close()
        await eventually(lambda: _agent_status(harness, "a1", "offline"))

        await session_service.set_desired_state(harness.cp, ALICE, session.id, "hibernated")

        async def queued() -> bool:
            commands = await store.list_commands(session_id=session.id, statuses=["pending"])
            return [c.command_type for c in commands] == ["hibernate"]

        await eventually(queued)
        current = await store.get_session(session.id)
        assert current is not None
        assert current.state == "running"  # nothing has happened yet

        back = await harness.agent("a1", state=host)
        hibernated = await harness.wait_state(session.id, "hibernated")
        assert hibernated.generation == 2
        [command] = back.commands
        assert (command.action, command.generation) == ("hibernate", 2)
        assert host.sessions[session.id].state == "hibernated"


@pytest.mark.asyncio
async def test_lost_ack_is_redelivered_and_the_duplicate_is_harmless(harness: Harness) -> None:
    """Without an ack the command is sent again; the repeat starts nothing twice."""
    store = harness.cp.store
    sim = await harness.agent("a1")
    sim.drop_acks = 1  # the first delivery goes unanswered: its ack and result are "lost"
    await harness.template()
    session = await harness.session()
    await harness.wait_state(session.id, "running")

    first, second = sim.commands
    assert first.command_id == second.command_id
    assert sim.state.starts == 1  # the platform started it once
    [row] = await store.list_commands(session_id=session.id)
    assert (row.status, row.attempts) == ("completed", 2)

    # The withheld result of the first delivery arrives late: a duplicate.
    await sim.send(sim.held[0])
    # Frames are handled in order, so the answer to this one shows the duplicate was seen.
    await sim.send(CommandAck(command_id="c-not-a-command"))
    error = await sim.next_error()
    assert error.code == "unknown_command"
    assert len(sim.errors) == 1  # the duplicate result itself drew no error
    current = await store.get_session(session.id)
    assert current is not None
    assert current.state == "running"
    assert sample(harness, "streamspace_commands_total", action="start", outcome="completed") == 1


@pytest.mark.asyncio
async def test_stale_fencing_epoch_is_refused(harness: Harness) -> None:
    """An agent with an epoch below the highest seen is closed with 4409 and a reason."""
    store = harness.cp.store
    leader = await harness.agent("a1", fencing_epoch=5)
    deposed = await harness.agent("a1", connect=False, fencing_epoch=3)
    with pytest.raises(Refused) as refused:
        await deposed.connect()
    assert refused.value.code == 4409
    assert refused.value.reason == "stale fencing epoch 3 < 5: a newer leader exists"

    agent = await store.get_agent("a1")
    assert agent is not None
    assert leader.welcome is not None
    assert (agent.status, agent.fencing_epoch) == ("online", 5)
    assert agent.websocket_conn_id == leader.welcome.connection_id
    assert leader.closed is not None
    assert not leader.closed.done()

    successor = await harness.agent("a1", fencing_epoch=6)
    assert await leader.wait_closed() == Closed(4000, "superseded by a newer connection")
    agent = await store.get_agent("a1")
    assert agent is not None
    assert successor.welcome is not None
    assert (agent.fencing_epoch, agent.websocket_conn_id) == (6, successor.welcome.connection_id)


@pytest.mark.asyncio
async def test_second_process_of_an_agent_is_refused_while_the_first_lives(
    harness: Harness,
) -> None:
    """Two processes with one AGENT_ID and HA off never split its sessions: the second
    is refused (4429) while the first is connected and heartbeating, and is welcome once
    the first is gone; a reconnect of the same process still replaces its old socket."""
    first = await harness.agent("a1", connect=False)
    await first.connect(instance_id="host-a_1")
    second = await harness.agent("a1", connect=False)
    with pytest.raises(Refused) as refused:
        await second.connect(instance_id="host-b_2")
    assert refused.value.code == 4429
    assert "already connected from another process" in refused.value.reason
    assert first.closed is not None
    assert not first.closed.done()

    same = await harness.agent("a1", connect=False, state=first.state)
    await same.connect(instance_id="host-a_1")
    assert await first.wait_closed() == Closed(4000, "superseded by a newer connection")

    await same.close()

    async def offline() -> bool:
        agent = await harness.cp.store.get_agent("a1")
        return agent is not None and agent.status == "offline"

    await eventually(offline)
    retry = await harness.agent("a1", connect=False)
    welcome = await retry.connect(instance_id="host-b_2")
    agent = await harness.cp.store.get_agent("a1")
    assert agent is not None
    assert agent.websocket_conn_id == welcome.connection_id
    assert agent.metadata["instance_id"] == "host-b_2"


@pytest.mark.asyncio
async def test_agent_of_another_scope_is_refused_while_sessions_live_where_it_ran(
    harness: Harness,
) -> None:
    """Moving an AGENT_ID to another host would strand its sessions: a process of another
    scope that does not report them is refused even after the first one disconnected; the
    first one, back with them, is welcome and they stay running."""
    first = await harness.agent("a1", connect=False)
    await first.connect(instance_id="host-a")
    await harness.template()
    session = await harness.session()
    await harness.wait_state(session.id, "running")
    await first.close()

    async def offline() -> bool:
        agent = await harness.cp.store.get_agent("a1")
        return agent is not None and agent.status == "offline"

    await eventually(offline)
    elsewhere = await harness.agent("a1", connect=False)
    with pytest.raises(Refused) as refused:
        await elsewhere.connect(instance_id="host-b")
    assert refused.value.code == 4429
    assert "1 session(s) live where this agent last ran" in refused.value.reason

    back = await harness.agent("a1", connect=False, state=first.state)
    await back.connect(instance_id="host-a")
    current = await harness.wait_state(session.id, "running")
    assert current.agent_id == "a1"


@pytest.mark.asyncio
async def test_reconnect_while_old_socket_heartbeats_never_marks_agent_offline(
    store: Store, tmp_path: Path
) -> None:
    """The old socket's cleanup, which runs after the new registration, leaves it online."""
    settings = fast_settings(tmp_path, agent_heartbeat_timeout="600ms")  # beats every 200ms
    async with served(settings, store) as harness:
        old = await harness.agent("a1")
        await old.wait_for(lambda: old.beats >= 2)
        new = await harness.agent("a1", state=old.state)
        assert await old.wait_closed() == Closed(4000, "superseded by a newer connection")

        async def old_cleaned_up() -> bool:
            return agent_sockets(harness) == 1

        await eventually(old_cleaned_up)
        agent = await store.get_agent("a1")
        assert agent is not None
        assert new.welcome is not None
        assert (agent.status, agent.websocket_conn_id) == ("online", new.welcome.connection_id)

        beats = new.beats
        await new.wait_for(lambda: new.beats >= beats + 4)  # longer than the timeout
        agent = await store.get_agent("a1")
        assert agent is not None
        assert agent.status == "online"
        assert new.closed is not None
        assert not new.closed.done()


@pytest.mark.asyncio
async def test_heartbeat_of_a_connection_taken_over_elsewhere_closes_it(harness: Harness) -> None:
    """A heartbeat on a socket that is no longer the agent's connection closes that socket."""
    store = harness.cp.store
    sim = await harness.agent("a1", heartbeat=False)
    agent = await store.get_agent("a1")
    assert agent is not None
    # Another replica registers a newer connection of the same agent.
    await store.register_agent(agent.model_copy(update={"websocket_conn_id": "ws-elsewhere"}))
    await sim.send_heartbeat()
    assert await sim.wait_closed() == Closed(4000, "superseded by a newer connection")

    async def cleaned_up() -> bool:
        return agent_sockets(harness) == 0

    await eventually(cleaned_up)
    agent = await store.get_agent("a1")
    assert agent is not None
    assert (agent.status, agent.websocket_conn_id) == ("online", "ws-elsewhere")


@pytest.mark.asyncio
async def test_missing_wrong_and_revoked_tokens_are_refused(harness: Harness) -> None:
    """No valid token, no socket: HTTP 401 with the API's error body, before the handshake."""
    store = harness.cp.store
    token = await harness.token("a1")
    [record] = await store.list_agent_tokens("a1")
    await store.revoke_agent_token(record.token_id, utcnow())
    for presented in (None, "ssa_0000_not-a-token", token):
        sim = AgentSim(harness.url, presented, "a1")
        with pytest.raises(Refused) as refused:
            await sim.connect()
        assert refused.value.code == 401
        assert '"code": "unauthorized"' in refused.value.reason
    assert await store.get_agent("a1") is None
    assert agent_sockets(harness) == 0


@pytest.mark.asyncio
async def test_a_token_revoked_while_its_agent_registers_is_refused(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revocation lands after the handshake's check and before the socket is in the
    hub, so its notice finds no socket to close: the registration's own check refuses."""
    store = harness.cp.store
    token = await harness.token("a1")
    [record] = await store.list_agent_tokens("a1")
    register_agent = store.register_agent

    async def revoked_meanwhile(agent: Any) -> Any:
        await store.revoke_agent_token(record.token_id, utcnow())
        return await register_agent(agent)

    monkeypatch.setattr(store, "register_agent", revoked_meanwhile)
    sim = AgentSim(harness.url, token, "a1")
    with pytest.raises(Refused) as refused:
        await sim.connect()
    assert (refused.value.code, refused.value.reason) == (4403, "the agent token was revoked")
    assert harness.cp.hub.local("a1") is None
    agent = await store.get_agent("a1")
    assert agent is not None
    assert agent.status == "offline"


@pytest.mark.asyncio
async def test_hello_naming_another_agent_is_refused(harness: Harness) -> None:
    """A token works for its own agent id only."""
    sim = AgentSim(harness.url, await harness.token("a1"), "a2")
    with pytest.raises(Refused) as refused:
        await sim.connect()
    assert refused.value.code == 4403
    assert refused.value.reason == "token is for agent 'a1', not 'a2'"
    assert await harness.cp.store.get_agent("a2") is None


@pytest.mark.asyncio
async def test_unsupported_protocol_version_and_non_hello_first_frame_are_refused(
    harness: Harness,
) -> None:
    """The first frame must be a hello this control plane can speak."""
    sim = await harness.agent("a1", connect=False)
    with pytest.raises(Refused) as refused:
        await sim.connect(protocol_version=99)
    assert refused.value.code == 4400
    assert refused.value.reason == "unsupported protocol version 99; supported: 1"

    ws = await sim.open()
    await ws.send(dump_frame(Heartbeat()))
    with pytest.raises(ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4400
    assert closed.value.rcvd.reason == "expected agent.hello first, got agent.heartbeat"
    await sim.close()
    assert await harness.cp.store.get_agent("a1") is None


@pytest.mark.asyncio
async def test_bad_frames_get_error_frames_and_the_connection_stays_usable(
    harness: Harness,
) -> None:
    """Malformed, unknown, invalid, binary and unexpected frames are answered, not fatal."""
    sim = await harness.agent("a1")
    spec = SessionSpec(session_id="s-x", generation=1, user="u", template="t")
    command = Command(command_id="c-1", session_id="s-x", generation=1, action="start", spec=spec)
    cases: list[tuple[str | bytes | Command | CommandAck, str]] = [
        ("this is not json", "not_json"),
        ("[1, 2]", "not_object"),
        ('{"command_id": "c-1"}', "missing_type"),
        ('{"type": "session.teleport"}', "unknown_type"),
        ('{"type": "command.ack"}', "invalid"),
        (b"\x02\x00\x00\x00\x01vnc bytes", "bad_kind"),
        (command, "unexpected"),
        (b"\x01\x00", "truncated"),
        (dump_frame(await sim.hello()), "unexpected"),
        (CommandAck(command_id="c-unknown"), "unknown_command"),
    ]
    for i, (frame, code) in enumerate(cases):
        await sim.send(frame)
        error = await sim.next_error(i)
        assert error.code == code, (frame, error)
        assert error.message
    assert sample(harness, "streamspace_frames_refused_total", code="not_json") == 1

    # Still registered, still heartbeating, still running sessions.
    await sim.send_heartbeat()
    await harness.template()
    session = await harness.session()
    await harness.wait_state(session.id, "running")
    assert sim.closed is not None
    assert not sim.closed.done()


@pytest.mark.asyncio
async def test_heartbeat_timeout_marks_agent_offline_and_closes_it(
    store: Store, tmp_path: Path
) -> None:
    """An agent silent past AGENT_HEARTBEAT_TIMEOUT is offline and its socket closed."""
    async with served(fast_settings(tmp_path, agent_heartbeat_timeout="300ms"), store) as harness:
        sim = await harness.agent("a1", heartbeat=False)
        closed = await sim.wait_closed()
        assert closed.code == 4408
        assert closed.reason == "no heartbeat in 300ms"
        agent = await store.get_agent("a1")
        assert agent is not None
        assert agent.status == "offline"


async def _agent_status(harness: Harness, agent_id: str, status: str) -> bool:
    agent = await harness.cp.store.get_agent(agent_id)
    return agent is not None and agent.status == status


@pytest.mark.asyncio
@pytest.mark.parametrize("lost", ["result", "transition"])
async def test_a_result_the_store_fails_to_record_closes_the_socket_and_is_recorded_later(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, lost: str
) -> None:
    """The store fails once while a result is recorded: finishing the command, or moving the
    session after it. The agent is told to reconnect (1013, not an error frame it would
    ignore); once it has, the session is running, with the start carried out once."""
    store = harness.cp.store
    failures: list[str] = []
    if lost == "result":
        finish = store.finish_command

        async def finish_once(*args: Any, **kwargs: Any) -> Any:
            if not failures:
                failures.append("finish_command")
                raise StoreError("postgres: connection was closed in the middle of operation")
            return await finish(*args, **kwargs)

        monkeypatch.setattr(store, "finish_command", finish_once)
    else:
        update = store.update_session

        async def update_once(*args: Any, **fields: Any) -> Any:
            if not failures and fields.get("state") == "running":
                failures.append("update_session")
                raise StoreError("postgres: connection was closed in the middle of operation")
            return await update(*args, **fields)

        monkeypatch.setattr(store, "update_session", update_once)
    sim = await harness.agent("a1")
    await harness.template()
    session = await harness.session()

    closed = await sim.wait_closed()
    assert closed == Closed(
        1013,
        "could not record command.result: the store is unavailable; reconnect and send it again",
    )
    assert sim.errors == []
    assert len(failures) == 1

    again = await harness.agent("a1", state=sim.state)  # the agent reconnects, same host
    running = await harness.wait_state(session.id, "running")  # its hello says so at once
    assert running.agent_id == "a1"

    async def recorded() -> bool:
        return [c.status for c in await store.list_commands(session_id=session.id)] == ["completed"]

    await eventually(recorded)
    [row] = await store.list_commands(session_id=session.id)
    assert sim.state.starts == 1
    if lost == "result":  # the acked command is sent again and answered again
        assert [c.command_id for c in again.commands] == [row.command_id]
    events = await store.list_session_events(session.id)
    assert [e.state for e in events].count("running") == 1
