"""The scheduler: matching, least loaded, capacity, readable reasons, no double placement."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from agentsim import eventually, fast_settings
from agentsim import serve_control_plane as served
from apikit import make_hooks

from streamspace_controlplane.app import build_control_plane
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import AgentRecord, Session, Template
from streamspace_controlplane.scheduler import Scheduler, Want, choose_agent, scheduler_of
from streamspace_controlplane.services import sessions as session_service
from streamspace_controlplane.store.base import Store
from streamspace_sdk.hooks import Principal
from streamspace_sdk.platform import Capacity
from streamspace_sdk.protocol import Command

ALICE = Principal(username="alice", role="user")


@pytest_asyncio.fixture
async def cp(store: Store, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane whose loops are not running: each test runs scheduler passes itself."""
    await store.connect()
    await store.migrate()
    yield build_control_plane(fast_settings(tmp_path), store=store, hooks=make_hooks())


async def add_agent(
    cp: ControlPlane,
    agent_id: str,
    platform: str = "docker",
    region: str = "us-east",
    *,
    max_sessions: int = 10,
    **labels: str,
) -> AgentRecord:
    return await cp.store.register_agent(
        AgentRecord(
            agent_id=agent_id,
            platform=platform,
            region=region,
            labels=labels,
            capacity=Capacity(max_sessions=max_sessions),
            websocket_conn_id=f"ws-{agent_id}",
        )
    )


async def add_template(cp: ControlPlane, name: str, **fields: Any) -> Template:
    return await cp.store.create_template(Template(name=name, image=f"example/{name}", **fields))


async def new_session(cp: ControlPlane, template: str, **options: Any) -> Session:
    return await session_service.create_session(cp, ALICE, template, **options)


async def placed_on(cp: ControlPlane, agent_id: str, count: int, template: str) -> None:
    """Give ``agent_id`` ``count`` active sessions without running the scheduler."""
    for _ in range(count):
        session = await new_session(cp, template)
        assert await cp.store.place_session(session.id, agent_id, "docker")


async def agent_of(cp: ControlPlane, session: Session) -> str | None:
    current = await cp.store.get_session(session.id)
    assert current is not None
    return current.agent_id


@pytest.mark.asyncio
async def test_sessions_go_to_agents_matching_platform_region_and_labels(
    cp: ControlPlane,
) -> None:
    """Platform and labels come from the template; the request's region beats the template's."""
    await add_agent(cp, "d1", "docker", "us-east")
    await add_agent(cp, "k1", "kubernetes", "us-east")
    await add_agent(cp, "k2", "kubernetes", "eu-west", gpu="a100")
    await add_template(cp, "web", platform="docker")
    await add_template(cp, "k8s", platform="kubernetes", region="us-east")
    await add_template(cp, "gpu", platform="kubernetes", labels={"gpu": "a100"})
    web = await new_session(cp, "web")
    k8s_us = await new_session(cp, "k8s")
    k8s_eu = await new_session(cp, "k8s", region="eu-west")
    gpu = await new_session(cp, "gpu")
    asked = await new_session(cp, "web", labels={"disk": "ssd"})

    await scheduler_of(cp).run_once()

    assert await agent_of(cp, web) == "d1"
    assert await agent_of(cp, k8s_us) == "k1"
    assert await agent_of(cp, k8s_eu) == "k2"
    assert await agent_of(cp, gpu) == "k2"
    assert await agent_of(cp, asked) is None  # no docker agent has disk=ssd
    placed = await cp.store.get_session(gpu.id)
    assert placed is not None
    assert (placed.state, placed.platform, placed.reason) == (
        "scheduled",
        "kubernetes",
        "placed on agent k2",
    )
    [start] = await cp.store.list_commands(session_id=gpu.id)
    assert (start.agent_id, start.command_type, start.status) == ("k2", "start", "pending")
    spec = Command.model_validate(start.command_data).spec
    assert spec is not None
    assert spec.image == "example/gpu"
    events = await cp.store.list_session_events(gpu.id)
    assert (events[-1].previous_state, events[-1].state) == ("pending", "scheduled")


@pytest.mark.asyncio
async def test_least_loaded_agent_wins_and_ties_go_by_agent_id(cp: ControlPlane) -> None:
    """Fewest active sessions first, then the agent id, counting placements of the pass."""
    for agent_id in ("a", "b", "c"):
        await add_agent(cp, agent_id)
    await add_template(cp, "web", platform="docker")
    await placed_on(cp, "a", 2, "web")
    await placed_on(cp, "b", 1, "web")
    await placed_on(cp, "c", 1, "web")
    first = await new_session(cp, "web")
    second = await new_session(cp, "web")
    third = await new_session(cp, "web")

    await scheduler_of(cp).run_once()

    assert [await agent_of(cp, s) for s in (first, second, third)] == ["b", "c", "a"]


@pytest.mark.asyncio
async def test_no_room_leaves_session_pending_with_a_reason_recorded_once(
    cp: ControlPlane,
) -> None:
    """A full or mismatched fleet is explained; the reason is an event only when it changes."""
    await add_agent(cp, "d1", "docker", "us-east", max_sessions=1)
    await add_agent(cp, "k1", "kubernetes", "us-east")
    await add_agent(cp, "gone", "kubernetes", "eu-west")
    await cp.store.set_agent_offline("gone")
    await add_template(cp, "web", platform="docker")
    await add_template(cp, "k8s", platform="kubernetes")
    await placed_on(cp, "d1", 1, "web")
    web = await new_session(cp, "web")
    eu = await new_session(cp, "k8s", region="eu-west")

    await scheduler_of(cp).run_once()
    await scheduler_of(cp).run_once()

    for session, reason in [
        (
            web,
            "no online agent for platform docker has room (2 agents online: "
            "d1 docker/us-east full 1/1, k1 kubernetes/us-east other platform)",
        ),
        (
            eu,
            "no online agent for platform kubernetes in region eu-west has room (2 agents "
            "online: d1 docker/us-east other platform, k1 kubernetes/us-east other region)",
        ),
    ]:
        current = await cp.store.get_session(session.id)
        assert current is not None
        assert (current.state, current.agent_id, current.reason) == ("pending", None, reason)
        events = await cp.store.list_session_events(session.id)
        assert [e.detail for e in events].count(reason) == 1

    # The reason changes when the fleet does, and the session is placed once it fits.
    await add_agent(cp, "k2", "kubernetes", "eu-west", max_sessions=0)
    await scheduler_of(cp).run_once()
    current = await cp.store.get_session(eu.id)
    assert current is not None
    assert current.reason.endswith("k2 kubernetes/eu-west full 0/0)")
    await add_agent(cp, "k3", "kubernetes", "eu-west")
    await scheduler_of(cp).run_once()
    assert await agent_of(cp, eu) == "k3"
    assert await agent_of(cp, web) is None


def test_reason_names_a_few_agents_and_counts_the_rest() -> None:
    """The reason stays short with a big fleet."""
    agents = [
        AgentRecord(agent_id=f"a{i}", platform="docker", capacity=Capacity(max_sessions=1))
        for i in range(8)
    ]
    placement = choose_agent(Want("kubernetes", None, {}), agents, {})
    assert placement.agent is None
    assert placement.reason == (
        "no online agent for platform kubernetes has room (8 agents online: "
        "a0 docker/default other platform, a1 docker/default other platform, "
        "a2 docker/default other platform, a3 docker/default other platform, "
        "a4 docker/default other platform, … and 3 more)"
    )
    assert choose_agent(Want(None, None, {}), [], {}).reason == (
        "no online agent has room (no agents online)"
    )


@pytest.mark.asyncio
async def test_concurrent_passes_and_replicas_never_place_a_session_twice(
    cp: ControlPlane, store: Store, tmp_path: Path
) -> None:
    """Placement is an atomic store update: racing passes place each session exactly once."""
    for agent_id in ("a", "b", "c"):
        await add_agent(cp, agent_id, max_sessions=100)
    await add_template(cp, "web", platform="docker")
    sessions = [await new_session(cp, "web") for _ in range(30)]
    replica = build_control_plane(fast_settings(tmp_path), store=store, hooks=make_hooks())
    schedulers = [scheduler_of(cp), Scheduler(cp), scheduler_of(replica), Scheduler(replica)]

    await asyncio.gather(*(s.run_once() for s in schedulers))

    for session in sessions:
        current = await cp.store.get_session(session.id)
        assert current is not None
        assert current.state == "scheduled"
        events = await cp.store.list_session_events(session.id)
        assert [e.state for e in events].count("scheduled") == 1
        commands = await cp.store.list_commands(session_id=session.id)
        assert [c.command_type for c in commands] == ["start"]
        assert commands[0].agent_id == current.agent_id
    load = Counter([await agent_of(cp, s) for s in sessions])
    assert sum(load.values()) == 30


@pytest.mark.asyncio
async def test_pending_session_is_placed_when_a_matching_agent_registers(
    store: Store, tmp_path: Path
) -> None:
    """Over real sockets: no agent in the region, then one registers and runs it."""
    async with served(fast_settings(tmp_path), store) as harness:
        await harness.agent("us", region="us-east")
        await harness.template(region="eu-west")
        session = await harness.session()

        async def explained() -> bool:
            current = await store.get_session(session.id)
            return current is not None and "in region eu-west" in current.reason

        await eventually(explained)
        current = await store.get_session(session.id)
        assert current is not None
        assert current.state == "pending"
        assert current.reason == (
            "no online agent in region eu-west has room "
            "(1 agent online: us memory/us-east other region)"
        )

        eu = await harness.agent("eu", region="eu-west")
        running = await harness.wait_state(session.id, "running")
        assert running.agent_id == "eu"
        assert [c.session_id for c in eu.commands] == [session.id]
