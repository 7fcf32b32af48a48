"""The reconciler and the outbox's state machine, over real sockets.

Desired-state changes converge; what a (re)registering agent reports becomes the actual
state; unknown sessions are reported, never stopped; sessions of a vanished agent are
``lost`` and come back; commands that never finish expire.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from agentsim import Harness, eventually, fast_settings
from agentsim import serve_control_plane as served

from streamspace_controlplane.dispatcher import dispatcher_of
from streamspace_controlplane.models import DesiredState, Session, utcnow
from streamspace_controlplane.reconciler import reconciler_of
from streamspace_controlplane.services import sessions as session_service
from streamspace_controlplane.store.base import Store
from streamspace_sdk.hooks import Principal
from streamspace_sdk.platform import SessionSpec, SessionStatus
from streamspace_sdk.protocol import CommandAck, CommandResult
from streamspace_sdk.testing import MemoryPlatform, MemoryPlatformState

ALICE = Principal(username="alice", role="user")


async def running_session(harness: Harness, agent_id: str = "a1") -> Session:
    await harness.template()
    session = await harness.session()
    return await harness.wait_state(session.id, "running")


async def want(harness: Harness, session: Session, state: DesiredState) -> None:
    await session_service.set_desired_state(harness.cp, ALICE, session.id, state)


async def barrier(harness: Harness, sim_index: int = 0) -> None:
    """Return once the control plane has handled every frame the agent sent before."""
    sim = harness.sims[sim_index]
    seen = len(sim.errors)
    await sim.send(CommandAck(command_id="c-barrier"))
    error = await sim.next_error(seen)
    assert error.ref == "c-barrier"


@pytest.mark.asyncio
async def test_hibernate_wake_and_stop_converge(harness: Harness) -> None:
    """Each desired state is reached with one command at the new generation."""
    sim = await harness.agent("a1")
    session = await running_session(harness)

    await want(harness, session, "hibernated")
    hibernated = await harness.wait_state(session.id, "hibernated")
    assert sim.state.sessions[session.id].state == "hibernated"

    await want(harness, hibernated, "running")
    woken = await harness.wait_state(session.id, "running")
    assert sim.state.sessions[session.id].state == "running"

    await want(harness, woken, "stopped")
    stopped = await harness.wait_state(session.id, "stopped")
    assert session.id not in sim.state.sessions
    assert stopped.generation == 4
    assert [(c.action, c.generation) for c in sim.commands] == [
        ("start", 1),
        ("hibernate", 2),
        ("wake", 3),
        ("stop", 4),
    ]
    states = [e.state for e in await harness.cp.store.list_session_events(session.id)]
    assert "stopping" in states[states.index("hibernated") :]


@pytest.mark.asyncio
async def test_delete_stops_the_session_and_forgets_the_row(harness: Harness) -> None:
    """DELETE of a running session: the agent stops it, then the row is gone."""
    sim = await harness.agent("a1")
    session = await running_session(harness)

    deferred = await session_service.delete_session(harness.cp, ALICE, session.id)
    assert deferred is not None

    async def forgotten() -> bool:
        return await harness.cp.store.get_session(session.id) is None

    await eventually(forgotten)
    assert session.id not in sim.state.sessions
    assert sim.commands[-1].action == "stop"
    assert await harness.cp.store.list_commands(session_id=session.id) == []


@pytest.mark.asyncio
async def test_unknown_reported_session_is_audited_and_left_running(harness: Harness) -> None:
    """A session the store does not know is reported once, and never stopped."""
    host = MemoryPlatformState()
    stray = SessionSpec(session_id="s-stray", generation=3, user="bob", template="t")
    await MemoryPlatform(agent_id="a1", state=host).start(stray)

    sim = await harness.agent("a1", state=host)
    await sim.report(SessionStatus(session_id="s-stray", generation=3, state="running"))
    await barrier(harness)
    await reconciler_of(harness.cp).run_once()

    audit = [e for e in await harness.cp.store.list_audit() if e.action == "session.unknown"]
    assert [(e.actor, e.resource) for e in audit] == [("agent:a1", "session/s-stray")]
    assert audit[0].detail == {"state": "running", "generation": 3}
    assert sim.commands == []
    assert host.sessions["s-stray"].state == "running"


@pytest.mark.asyncio
async def test_sessions_of_a_vanished_agent_are_lost_then_running_when_it_returns(
    harness: Harness,
) -> None:
    """Past LOST_GRACE_PERIOD offline, sessions are lost; a return with them alive heals."""
    sim = await harness.agent("a1")
    session = await running_session(harness)
    host = sim.state
    await sim.close()

    lost = await harness.wait_state(session.id, "lost")
    assert lost.reason == "agent a1 offline for more than 300ms"

    back = await harness.agent("a1", state=host)
    running = await harness.wait_state(session.id, "running")
    assert running.generation == 1
    assert back.commands == []  # nothing to redo: it was running all along


@pytest.mark.asyncio
async def test_session_a_returning_agent_no_longer_runs_fails(harness: Harness) -> None:
    """An agent that comes back without a running session has lost it for good."""
    sim = await harness.agent("a1")
    session = await running_session(harness)
    await sim.close()
    await harness.agent("a1")  # a fresh host: the session is gone
    failed = await harness.wait_state(session.id, "failed")
    assert failed.reason == "agent a1 no longer runs this session"


@pytest.mark.asyncio
async def test_status_reports_update_the_actual_state_of_the_current_generation(
    harness: Harness,
) -> None:
    """A report about the current generation counts; one about an older one does not."""
    sim = await harness.agent("a1")
    session = await running_session(harness)

    await sim.report(
        SessionStatus(
            session_id=session.id,
            generation=1,
            state="running",
            platform_metadata={"pid": 42},
        )
    )
    await barrier(harness)
    current = await harness.cp.store.get_session(session.id)
    assert current is not None
    assert current.platform_metadata == {"pid": 42}

    await want(harness, session, "hibernated")
    await harness.wait_state(session.id, "hibernated")
    await sim.report(SessionStatus(session_id=session.id, generation=1, state="running"))
    await barrier(harness)
    current = await harness.cp.store.get_session(session.id)
    assert current is not None
    assert current.state == "hibernated"

    await sim.report(
        SessionStatus(session_id=session.id, generation=2, state="failed", detail="disk full")
    )
    failed = await harness.wait_state(session.id, "failed")
    assert failed.reason == "disk full"


@pytest.mark.asyncio
async def test_results_of_an_older_generation(harness: Harness) -> None:
    """An old failure changes nothing; an old success is news the reconciler acts on."""
    store = harness.cp.store
    sim = await harness.agent("a1", auto_execute=False)
    await harness.template()

    # Desired state changes while the start is in flight; the start then succeeds.
    first = await harness.session()
    start = await sim.command_for(first.id, "start")
    await want(harness, first, "hibernated")
    await sim.ack(start)
    await sim.send(await sim.execute(start))
    hibernate = await sim.command_for(first.id, "hibernate")
    assert hibernate.generation == 2
    current = await store.get_session(first.id)
    assert current is not None
    assert current.state == "running"  # the old success moved it; the reconciler followed
    await sim.ack(hibernate)
    await sim.send(await sim.execute(hibernate))
    await harness.wait_state(first.id, "hibernated")

    # A stop overtakes a start; the start, refused as stale, then fails: nothing moves.
    second = await harness.session()
    start = await sim.command_for(second.id, "start")
    await want(harness, second, "stopped")
    stop = await sim.command_for(second.id, "stop")
    assert stop.generation == 2
    await sim.ack(stop)
    await sim.send(await sim.execute(stop))
    await harness.wait_state(second.id, "stopped")
    await sim.send(
        CommandResult(
            command_id=start.command_id,
            session_id=second.id,
            generation=1,
            ok=False,
            reason="generation 1 is older than 2",
        )
    )
    await barrier(harness)
    current = await store.get_session(second.id)
    assert current is not None
    assert current.state == "stopped"
    [row] = await store.list_commands(session_id=second.id, statuses=["failed"])
    assert row.command_id == start.command_id


@pytest.mark.asyncio
async def test_command_not_completed_in_time_expires_and_fails_the_session(
    store: Store, tmp_path: Path
) -> None:
    """COMMAND_EXPIRY bounds how long a session waits for an agent that never answers."""
    async with served(fast_settings(tmp_path, command_expiry="300ms"), store) as harness:
        sim = await harness.agent("a1", auto_execute=False)
        await harness.template()
        session = await harness.session()
        failed = await harness.wait_state(session.id, "failed")
        assert failed.reason == "agent a1 did not complete start in 300ms"
        [row] = await store.list_commands(session_id=session.id)
        assert row.status == "expired"
        assert len(sim.commands) >= 1
        expired = harness.cp.metrics.registry.get_sample_value(
            "streamspace_commands_total", {"action": "start", "outcome": "expired"}
        )
        assert expired == 1


@pytest.mark.asyncio
async def test_gauges_count_agents_and_sessions(harness: Harness) -> None:
    """Each pass refreshes the agents and sessions gauges."""
    await harness.agent("a1")
    await running_session(harness)
    await reconciler_of(harness.cp).run_once()
    registry = harness.cp.metrics.registry
    assert registry.get_sample_value("streamspace_agents", {"status": "online"}) == 1
    assert registry.get_sample_value("streamspace_agents", {"status": "offline"}) == 0
    assert registry.get_sample_value("streamspace_sessions", {"state": "running"}) == 1
    assert registry.get_sample_value("streamspace_sessions", {"state": "pending"}) == 0


@pytest.mark.asyncio
async def test_a_stored_result_that_never_moved_its_session_is_applied_again(
    harness: Harness,
) -> None:
    """The store failed after keeping a start's result and before the session's transition:
    the full pass applies it, once. A session whose generation moved on since, or that
    changed after the result was stored, is left as it is."""
    store = harness.cp.store
    sim = await harness.agent("a1", auto_execute=False)
    await harness.template()
    now = utcnow()

    async def started_but_unapplied(*, stored: timedelta, changed: timedelta) -> Session:
        """A session ``starting`` whose start finished ``stored`` ago, last changed ``changed``
        ago, as if the store failed between ``finish_command`` and the transition."""
        session = await harness.session()
        start = await sim.command_for(session.id, "start")
        await sim.ack(start)
        await harness.wait_state(session.id, "starting")
        result = await sim.execute(start)
        finished = await store.finish_command(
            start.command_id, "completed", result.model_dump(mode="json"), now - stored
        )
        assert finished is not None
        updated = await store.update_session(session.id, updated_at=now - changed)
        assert updated is not None
        return updated

    lost = await started_but_unapplied(stored=timedelta(hours=1), changed=timedelta(hours=2))
    moved_on = await started_but_unapplied(stored=timedelta(hours=1), changed=timedelta(hours=2))
    await store.update_session(moved_on.id, generation=2, updated_at=now - timedelta(hours=2))
    changed = await started_but_unapplied(stored=timedelta(hours=1), changed=timedelta(minutes=1))

    reconciler = reconciler_of(harness.cp)
    await reconciler.run_once()
    healed = await harness.wait_state(lost.id, "running")
    assert healed.platform_metadata == {"user": "alice"}
    await reconciler.run_once()  # nothing left to apply
    events = await store.list_session_events(lost.id)
    assert [(e.previous_state, e.state) for e in events][-2:] == [
        ("scheduled", "starting"),
        ("starting", "running"),
    ]
    for session in (moved_on, changed):
        now_is = await store.get_session(session.id)
        assert now_is is not None
        assert now_is.state == "starting", session.id
    assert await dispatcher_of(harness.cp).reapply_results() == 0
