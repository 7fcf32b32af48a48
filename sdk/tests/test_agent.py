"""Tests of the agent runtime against a :class:`FakeControlPlane` over real sockets.

Every agent runs sessions on a :class:`MemoryPlatform` (or an instrumented subclass), the
control plane is a real WebSocket server speaking the real protocol, and tests wait on frames
and events rather than sleeping: the fake asks for heartbeats every 0.05 s, and the backoff
between connection attempts is at most 0.05 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from streamspace_sdk import (
    Agent,
    AgentSettings,
    ConfigError,
    DriverNotFound,
    PlatformError,
    SessionVetoed,
    drivers,
    hookimpl,
)
from streamspace_sdk.agent import AGENT_PATH, Backoff, agent_url
from streamspace_sdk.agent._status import GONE_DETAIL
from streamspace_sdk.cli import main
from streamspace_sdk.hooks import Hooks, SessionEvent, make_plugin_manager
from streamspace_sdk.leases import MemoryLease, MemoryLeaseStore
from streamspace_sdk.platform import SessionSpec, SessionStatus
from streamspace_sdk.protocol import (
    CommandAck,
    CommandResult,
    Error,
    Heartbeat,
    SessionStatusReport,
    Shutdown,
    VncClose,
    VncOpen,
)
from streamspace_sdk.settings import PluginSettings
from streamspace_sdk.testing import FakeControlPlane, MemoryPlatform, MemoryPlatformState

TOKEN = "test-agent-token"
FAST = Backoff(base_s=0.01, cap_s=0.05, reset_after_s=60.0)
HA: dict[str, Any] = {
    "enable_ha": True,
    "ha_backend": "memory",
    "lease_duration": 0.6,
    "renew_deadline": 0.4,
    "retry_period": 0.1,
}
"""Leader election fast enough for real time: a released lease is taken within 0.12 s."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the host's environment out of the agents' settings."""
    for name in (*AgentSettings.model_fields, *PluginSettings.model_fields, "lease_key"):
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="streamspace.agent")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamspace.agent" and r.levelno >= level
    ]


def no_plugins(*plugins: object) -> Hooks:
    return Hooks(
        make_plugin_manager(
            settings=PluginSettings(streamspace_load_plugins=""),
            plugins=plugins,
            load_entrypoints=False,
        )
    )


def make_agent(
    fake: FakeControlPlane,
    platform: MemoryPlatform | None = None,
    *,
    hooks: Hooks | None = None,
    lease: MemoryLease | None = None,
    **settings: Any,
) -> Agent:
    values: dict[str, Any] = {
        "agent_id": "agent-1",
        "control_plane_url": fake.url,
        "agent_token": TOKEN,
        "health_port": 0,
        **settings,
    }
    agent_settings = AgentSettings(**values)
    if platform is None:
        platform = MemoryPlatform(agent_id=agent_settings.agent_id)
    return Agent(
        agent_settings,
        platform,
        hooks=hooks if hooks is not None else no_plugins(),
        lease=lease,
        backoff=FAST,
    )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    """Serve ``agent`` in a task; stop it (cleanly) and check it ended well on the way out."""
    task = asyncio.create_task(agent.serve())
    try:
        yield task
    finally:
        await agent.stop()
        await task


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for a condition nothing notifies about (who the elector saw holding the lease)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the elector signals no change of holder
            await asyncio.sleep(0.01)


def spec(session_id: str, generation: int = 1) -> SessionSpec:
    return SessionSpec(session_id=session_id, generation=generation, user="bob", template="t")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


class GatedPlatform(MemoryPlatform):
    """A memory platform whose calls can be held at a gate, recording who entered when.

    The record is taken in the public methods, before the base class's per-session lock,
    so it shows the order in which the *agent* let calls through.
    """

    def __init__(self, *, agent_id: str, state: MemoryPlatformState | None = None) -> None:
        super().__init__(agent_id=agent_id, state=state)
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: list[tuple[str, str]] = []
        self.left: list[tuple[str, str]] = []
        self.specs: list[SessionSpec] = []
        self.explode: str | None = None
        self._changed = asyncio.Event()

    def close_gate(self, session_id: str) -> asyncio.Event:
        gate = self.gates[session_id] = asyncio.Event()
        return gate

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                changed = self._changed
                await changed.wait()

    async def _through(self, action: str, session_id: str) -> None:
        self.entered.append((action, session_id))
        self._notify()
        if self.explode is not None:
            raise RuntimeError(self.explode)
        gate = self.gates.get(session_id)
        if gate is not None:
            await gate.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def start(self, spec: SessionSpec) -> SessionStatus:
        self.specs.append(spec)
        await self._through("start", spec.session_id)
        try:
            return await super().start(spec)
        finally:
            self.left.append(("start", spec.session_id))
            self._notify()

    async def stop(self, session_id: str, generation: int) -> SessionStatus:
        await self._through("stop", session_id)
        try:
            return await super().stop(session_id, generation)
        finally:
            self.left.append(("stop", session_id))
            self._notify()


# -- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "dialled"),
    [
        ("wss://streamspace.example.com", f"wss://streamspace.example.com{AGENT_PATH}"),
        ("wss://streamspace.example.com/", f"wss://streamspace.example.com{AGENT_PATH}"),
        ("ws://cp:8000/streamspace", f"ws://cp:8000/streamspace{AGENT_PATH}"),
        ("ws://streamspace-api:8000/agent/ws", "ws://streamspace-api:8000/agent/ws"),
        (
            "wss://streamspace.example.com/api/v1/agents/hub",
            "wss://streamspace.example.com/api/v1/agents/hub",
        ),
        (f"ws://cp{AGENT_PATH}", f"ws://cp{AGENT_PATH}"),
    ],
)
def test_agent_url(configured: str, dialled: str) -> None:
    """CONTROL_PLANE_URL gets the agent path unless it already names an agent endpoint."""
    assert agent_url(configured) == dialled


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    """The n-th wait is drawn from [0, min(cap, base * 2**n)]."""
    backoff = Backoff()
    assert [backoff.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    rng = random.Random(7)
    draws = [backoff.delay(3, rng) for _ in range(200)]
    assert all(0 <= d <= 4 for d in draws)
    assert max(draws) > 3, "full jitter spreads over the whole range"
    assert min(draws) < 1, "full jitter spreads over the whole range"
    with pytest.raises(ValueError, match="cap_s"):
        Backoff(base_s=2, cap_s=1)


# -- registration and heartbeats ---------------------------------------------------------


@pytest.mark.asyncio
async def test_registers_with_the_platforms_sessions(logs: pytest.LogCaptureFixture) -> None:
    """The hello names the agent, caps capacity by the settings and lists running sessions."""
    state = MemoryPlatformState(max_sessions=10)
    earlier = MemoryPlatform(agent_id="agent-1", state=state)
    await earlier.start(spec("s1"))
    await earlier.start(spec("s2", 3))
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(
            fake,
            MemoryPlatform(agent_id="agent-1", state=state),
            max_sessions=4,
            max_cpu=2.5,
            max_memory=4,
            region="eu-west",
        )
        async with running(agent):
            conn = await fake.wait_registered()
            await fake.wait_for(lambda: agent.registered)
            assert agent.connection_id == conn.conn_id
    hello = conn.hello
    assert hello is not None
    assert conn.headers["Authorization"] == f"Bearer {TOKEN}"
    assert (hello.agent_id, hello.platform, hello.region) == ("agent-1", "memory", "eu-west")
    assert hello.capacity.max_sessions == 4
    assert (hello.capacity.max_cpu_m, hello.capacity.max_memory_mib) == (2500, 4096)
    assert hello.usage.sessions == 2
    assert hello.transports == ["ws-mux"]
    assert (hello.lease_holder, hello.fencing_epoch) == (None, 0)
    assert {(s.session_id, s.generation, s.state) for s in hello.sessions} == {
        ("s1", 1, "running"),
        ("s2", 3, "running"),
    }
    said = messages(logs)
    for phrase in (
        f"Registering agent with Control Plane at {agent.url} (agent agent-1)",
        "Agent registered successfully: agent-1",
        f"WebSocket connection established (connection {conn.conn_id})",
        "Heartbeat sent every 0.05 seconds",
    ):
        assert phrase in said, phrase
    registering = said.index(
        "Registering agent with Control Plane at " + agent.url + " (agent agent-1)"
    )
    assert registering < said.index("Agent registered successfully: agent-1"), "dial, then welcome"
    assert sum("agent-1" in m for m in said[registering + 1 :]) == 1, (
        "the agent's id is told once on registering, not again in another wording"
    )
    assert not any(TOKEN in m for m in said)
    assert state.sessions.keys() == {"s1", "s2"}, "stopping the agent keeps sessions running"


@pytest.mark.asyncio
async def test_a_password_in_the_url_is_shown_by_no_log_line(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A password in CONTROL_PLANE_URL's user part is shown as ``***`` by the registering
    line, and by no log line at all (the connection refused, here)."""
    settings = AgentSettings(
        agent_id="agent-1",
        control_plane_url=f"ws://ops:s3cret-pw@127.0.0.1:{free_port()}",
        agent_token=SecretStr(TOKEN),
        health_port=0,
    )
    agent = Agent(settings, MemoryPlatform(agent_id="agent-1"), hooks=no_plugins(), backoff=FAST)
    await agent._connect_once()  # nothing listens: one attempt, refused
    registering = [m for m in messages(logs) if m.startswith("Registering agent")]
    assert registering == [
        f"Registering agent with Control Plane at ws://ops:***@127.0.0.1:"
        f"{urlsplit(agent.url).port}{AGENT_PATH} (agent agent-1)"
    ]
    assert any(m.startswith("Could not connect to the control plane at") for m in messages(logs))
    assert not [m for m in messages(logs) if "s3cret-pw" in m]


@pytest.mark.asyncio
@pytest.mark.parametrize(("welcome_s", "setting_s"), [(0.05, 10.0), (10.0, 0.05)])
async def test_heartbeats_at_the_smaller_interval(welcome_s: float, setting_s: float) -> None:
    """Heartbeats follow the welcome's interval or HEARTBEAT_INTERVAL, whichever is smaller."""
    state = MemoryPlatformState()
    await MemoryPlatform(agent_id="agent-1", state=state).start(spec("s1"))
    async with FakeControlPlane(token=TOKEN, heartbeat_interval_s=welcome_s) as fake:
        agent = make_agent(
            fake, MemoryPlatform(agent_id="agent-1", state=state), heartbeat_interval=setting_s
        )
        async with running(agent):
            beats = [await fake.next_frame(Heartbeat) for _ in range(3)]
    assert all(b.usage.sessions == 1 for b in beats)
    loop_s = (beats[-1].sent_at - beats[0].sent_at).total_seconds()
    assert loop_s < 2, "three beats at 0.05 s cannot take seconds"


# -- commands ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_command_is_acked_then_answered() -> None:
    """A start is acknowledged at once, carried out, answered ok with the status, reported."""
    state = MemoryPlatformState()
    platform = MemoryPlatform(agent_id="agent-1", state=state)
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake, platform)):
        await fake.wait_registered()
        command = await fake.command("start", "s1")
        result = await fake.next_frame(CommandResult)
        report = await fake.next_frame(SessionStatusReport)
        stop = await fake.command("stop", "s1", 2)
        stopped = await fake.next_frame(CommandResult)
    kinds = [f.type for f in fake.frames if not isinstance(f, Heartbeat)]
    assert kinds.index("command.ack") < kinds.index("command.result")
    assert fake.frames_of(CommandAck)[0].command_id == command.command_id
    assert (result.command_id, result.ok, result.reason) == (command.command_id, True, None)
    assert result.status is not None
    assert result.status.state == "running"
    assert (report.status.session_id, report.status.state) == ("s1", "running")
    assert (stopped.command_id, stopped.ok) == (stop.command_id, True)
    assert stopped.status is not None
    assert stopped.status.state == "stopped"
    assert "s1" not in state.sessions


@pytest.mark.asyncio
async def test_each_command_is_logged_as_received_in_the_seeds_words(
    logs: pytest.LogCaptureFixture,
) -> None:
    """Every command is logged at INFO on arrival as the seed guide shows it, ``Received
    start_session command for session <id>``, with its command id and generation."""
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake)):
        await fake.wait_registered()
        commands = [
            await fake.command("start", "s1", 1),
            await fake.command("hibernate", "s1", 2),
            await fake.command("wake", "s1", 3),
            await fake.command("stop", "s1", 4),
        ]
        results = [await fake.next_frame(CommandResult) for _ in commands]
    assert [r.command_id for r in results] == [c.command_id for c in commands]
    received = [m for m in messages(logs) if m.startswith("Received ")]
    assert received[0] == (
        f"Received start_session command for session s1 (command {commands[0].command_id}, "
        "generation 1)"
    )
    for action, command in zip(("start", "hibernate", "wake", "stop"), commands, strict=True):
        assert any(
            m.startswith(
                f"Received {action}_session command for session s1 (command "
                f"{command.command_id}, generation {command.generation})"
            )
            for m in received
        ), action
    assert len(received) == 4, "one line per command"


@pytest.mark.asyncio
async def test_a_command_waiting_for_its_session_says_so(logs: pytest.LogCaptureFixture) -> None:
    """A command that arrives while its session is busy is logged on arrival, saying what
    it waits for."""
    platform = GatedPlatform(agent_id="agent-1")
    gate = platform.close_gate("s1")
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake, platform)):
        await fake.wait_registered()
        await fake.command("start", "s1")
        await platform.wait_until(lambda: ("start", "s1") in platform.entered)
        second = await fake.command("stop", "s1", 2)
        await fake.wait_for(
            lambda: any(a.command_id == second.command_id for a in fake.frames_of(CommandAck))
        )
        said = messages(logs)
        gate.set()
        await fake.next_frame(CommandResult)
        await fake.next_frame(CommandResult)
    assert (
        f"Received stop_session command for session s1 (command {second.command_id}, "
        "generation 2); waits for 1 earlier command(s) of the session"
    ) in said


@pytest.mark.asyncio
async def test_failing_start_reports_the_reason() -> None:
    """A PlatformError becomes ok=false with its message as the reason."""
    state = MemoryPlatformState()
    state.fail_next_start = "image example/desktop:1 not found"
    platform = MemoryPlatform(agent_id="agent-1", state=state)
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake, platform)):
        await fake.wait_registered()
        await fake.command("start", "s1")
        result = await fake.next_frame(CommandResult)
    assert (result.ok, result.reason) == (False, "image example/desktop:1 not found")
    assert result.status is None
    assert not state.sessions


@pytest.mark.asyncio
async def test_stale_and_unsupported_commands_report_the_reason() -> None:
    """StaleGeneration and NotSupported (PlatformErrors) come back as reasons."""

    class NoHibernate(MemoryPlatform):
        capabilities = frozenset({"adopt"})

    platform = NoHibernate(agent_id="agent-1")
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake, platform)):
        await fake.wait_registered()
        await fake.command("start", "s1", 2)
        assert (await fake.next_frame(CommandResult)).ok
        await fake.command("start", "s1", 1)
        stale = await fake.next_frame(CommandResult)
        await fake.command("hibernate", "s1", 3)
        unsupported = await fake.next_frame(CommandResult)
    assert not stale.ok
    assert "refusing generation 1" in (stale.reason or "")
    assert stale.status is not None
    assert stale.status.generation == 2
    assert not unsupported.ok
    assert "hibernate" in (unsupported.reason or "")


@pytest.mark.asyncio
async def test_unexpected_exception_is_an_internal_error(logs: pytest.LogCaptureFixture) -> None:
    """A bug in a driver is logged with its traceback and reported as an internal error."""
    platform = GatedPlatform(agent_id="agent-1")
    platform.explode = "driver bug"
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake, platform)):
        await fake.wait_registered()
        await fake.command("start", "s1")
        result = await fake.next_frame(CommandResult)
        platform.explode = None
        await fake.command("start", "s2")
        assert (await fake.next_frame(CommandResult)).ok, "the agent carries on"
    assert not result.ok
    assert result.reason == "internal error: RuntimeError: driver bug"
    assert any(r.exc_info and "failed unexpectedly" in r.getMessage() for r in logs.records)


@pytest.mark.asyncio
async def test_one_session_in_order_other_sessions_concurrently() -> None:
    """Commands for one session wait for each other; another session's command does not."""
    platform = GatedPlatform(agent_id="agent-1")
    gate = platform.close_gate("s1")
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake, platform)):
        await fake.wait_registered()
        first = await fake.command("start", "s1")
        await platform.wait_until(lambda: ("start", "s1") in platform.entered)
        second = await fake.command("stop", "s1", 2)
        await fake.wait_for(
            lambda: any(a.command_id == second.command_id for a in fake.frames_of(CommandAck))
        )
        other = await fake.command("start", "s2")
        done = await fake.next_frame(CommandResult)
        assert done.command_id == other.command_id, "s2 finished while s1 was held"
        assert platform.entered == [("start", "s1"), ("start", "s2")]
        gate.set()
        results = [await fake.next_frame(CommandResult) for _ in range(2)]
    assert [r.command_id for r in results] == [first.command_id, second.command_id]
    assert all(r.ok for r in results)
    assert platform.entered[-1] == ("stop", "s1")
    assert platform.left.index(("start", "s1")) < platform.left.index(("stop", "s1"))


@pytest.mark.asyncio
async def test_redelivered_command_is_harmless() -> None:
    """A command sent again, while running or after it finished, starts nothing twice."""
    state = MemoryPlatformState()
    platform = GatedPlatform(agent_id="agent-1", state=state)
    gate = platform.close_gate("s1")
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake, platform)):
        await fake.wait_registered()
        command = await fake.command("start", "s1")
        await platform.wait_until(lambda: bool(platform.entered))
        await fake.send(command)  # again, while it runs
        await fake.wait_for(lambda: len(fake.frames_of(CommandAck)) == 2)
        gate.set()
        first = await fake.next_frame(CommandResult)
        await fake.send(command)  # again, after it finished: answered from memory
        second = await fake.next_frame(CommandResult)
        await fake.command("start", "s1", command_id="cmd-new-id")  # forgotten: re-run
        third = await fake.next_frame(CommandResult)
    assert len(fake.frames_of(CommandAck)) == 4
    assert first == second
    assert third.ok
    assert third.status == first.status
    assert len(fake.frames_of(CommandResult)) == 3
    assert state.starts == 1, "the platform started the session once"


@pytest.mark.asyncio
async def test_status_reported_when_the_platform_changes() -> None:
    """The poll reports a session that failed, or vanished, without a command."""
    state = MemoryPlatformState()
    events: list[SessionEvent] = []

    class Observer:
        @hookimpl
        def session_event(self, event: SessionEvent) -> None:
            events.append(event)

    platform = MemoryPlatform(agent_id="agent-1", state=state)
    await platform.start(spec("s1"))
    await platform.start(spec("s2"))
    hooks = no_plugins(Observer())
    async with (
        FakeControlPlane(token=TOKEN) as fake,
        running(make_agent(fake, platform, hooks=hooks)),
    ):
        await fake.wait_registered()
        state.sessions["s1"] = state.sessions["s1"].model_copy(
            update={"state": "failed", "detail": "Xvnc exited with status 1"}
        )
        failed = await fake.next_frame(SessionStatusReport)
        del state.sessions["s2"]
        gone = await fake.next_frame(SessionStatusReport)
        await fake.wait_for(lambda: len(events) >= 2)
        beats = len(fake.frames_of(Heartbeat))
        await fake.wait_for(lambda: len(fake.frames_of(Heartbeat)) >= beats + 3)
    assert (failed.status.session_id, failed.status.state) == ("s1", "failed")
    assert failed.status.detail == "Xvnc exited with status 1"
    assert (gone.status.session_id, gone.status.state, gone.status.detail) == (
        "s2",
        "failed",
        GONE_DETAIL,
    )
    assert len(fake.frames_of(SessionStatusReport)) == 2, "each change is reported once"
    assert [(e.session_id, e.previous_state, e.state) for e in events] == [
        ("s1", "running", "failed"),
        ("s2", "running", "failed"),
    ]


@pytest.mark.asyncio
async def test_prepare_session_spec_is_applied_and_can_veto() -> None:
    """Hook plugins change the spec the platform gets, or refuse it with a reason."""

    class Policy:
        @hookimpl
        def prepare_session_spec(self, spec: SessionSpec, agent_id: str) -> SessionSpec:
            if spec.session_id == "vetoed":
                raise SessionVetoed("no GPUs on this agent")
            return spec.model_copy(update={"env": {"PLACED_ON": agent_id}})

    platform = GatedPlatform(agent_id="agent-1")
    hooks = no_plugins(Policy())
    async with (
        FakeControlPlane(token=TOKEN) as fake,
        running(make_agent(fake, platform, hooks=hooks)),
    ):
        await fake.wait_registered()
        await fake.command("start", "s1")
        ok = await fake.next_frame(CommandResult)
        await fake.command("start", "vetoed")
        vetoed = await fake.next_frame(CommandResult)
    assert ok.ok
    assert platform.specs[0].env == {"PLACED_ON": "agent-1"}
    assert (vetoed.ok, vetoed.reason) == (False, "no GPUs on this agent")
    assert [s.session_id for s in platform.specs] == ["s1"], "a vetoed spec never arrives"


# -- connection loss and refusals ----------------------------------------------------------


@pytest.mark.asyncio
async def test_reconnects_after_a_drop_and_reports_its_sessions(
    logs: pytest.LogCaptureFixture,
) -> None:
    """After the socket drops, the agent dials again and its hello lists the sessions."""
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(fake)
        async with running(agent):
            await fake.wait_registered()
            await fake.command("start", "s1")
            await fake.next_frame(CommandResult)
            await fake.drop()  # TCP reset
            second = await fake.wait_registered(2)
            await fake.drop(1011, "internal error")
            third = await fake.wait_registered(3)
            await fake.wait_for(lambda: agent.connection_id == third.conn_id)
    for conn in (second, third):
        assert conn.hello is not None
        assert [s.session_id for s in conn.hello.sessions] == ["s1"]
    said = messages(logs)
    assert any("Connection to the control plane lost (1006)" in m for m in said)
    assert any("Connection to the control plane lost (1011: internal error)" in m for m in said)


@pytest.mark.asyncio
async def test_result_withheld_by_a_drop_is_sent_after_reconnecting() -> None:
    """A result finished while disconnected goes out on the next connection."""
    platform = GatedPlatform(agent_id="agent-1")
    gate = platform.close_gate("s1")
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(fake, platform)
        async with running(agent):
            await fake.wait_registered()
            command = await fake.command("start", "s1")
            await platform.wait_until(lambda: bool(platform.entered))
            fake.refuse_http(503, times=None)
            await fake.drop()
            await fake.wait_for(lambda: len(fake.http_refusals) >= 1)
            gate.set()
            await fake.wait_for(lambda: agent.unsent_results == 1)
            fake.stop_refusing()
            second = await fake.wait_registered(2)
            result = await fake.next_frame(CommandResult)
            await fake.wait_for(lambda: agent.unsent_results == 0)
    assert result.command_id == command.command_id
    assert result.ok
    assert result in second.frames
    assert not any(isinstance(f, CommandResult) for f in fake.registrations[0].frames)


@pytest.mark.asyncio
async def test_auth_refusal_is_retried_with_backoff_and_logged(
    logs: pytest.LogCaptureFixture,
) -> None:
    """HTTP 401 before the handshake: logged as a token problem, retried, then registered."""
    async with FakeControlPlane(token=TOKEN) as fake:
        fake.refuse_http(401, times=2)
        async with running(make_agent(fake)):
            await fake.wait_registered()
    assert fake.http_refusals == [401, 401]
    errors = [m for m in messages(logs, logging.ERROR) if "refused AGENT_TOKEN (HTTP 401)" in m]
    assert len(errors) == 2
    assert TOKEN not in logs.text, "the token is never logged"


@pytest.mark.asyncio
async def test_wrong_token_and_wrong_agent_are_logged(logs: pytest.LogCaptureFixture) -> None:
    """A bad token (401) and a token of another agent (4403) name AGENT_TOKEN and retry."""
    async with FakeControlPlane(token="the-right-one", agent_id="agent-1") as fake:
        agent = make_agent(fake, agent_token="a-wrong-one")
        async with running(agent):
            await fake.wait_for(lambda: len(fake.http_refusals) >= 2)
            assert not agent.readiness()[0]
        other = make_agent(fake, agent_id="agent-2", agent_token="the-right-one")
        async with running(other):
            await fake.wait_for(lambda: len([c for c in fake.connections if c.closed]) >= 2)
    assert {c.close_code for c in fake.connections} == {4403}
    said = messages(logs, logging.ERROR)
    assert any("refused AGENT_TOKEN (HTTP 401)" in m for m in said)
    assert any("refused AGENT_TOKEN for AGENT_ID agent-2 (4403" in m for m in said)


@pytest.mark.asyncio
async def test_stale_epoch_with_ha_steps_back_and_retries(logs: pytest.LogCaptureFixture) -> None:
    """4409 with HA: the agent stops leading, releases the lease, and contends again."""
    store = MemoryLeaseStore()
    async with FakeControlPlane(token=TOKEN) as fake:
        fake.refuse_registration(4409, "stale fencing epoch 1 < 2: a newer leader exists")
        agent = make_agent(fake, lease=MemoryLease(store=store), **HA)
        async with running(agent):
            conn = await fake.wait_registered()
            assert conn.hello is not None
            assert conn.hello.lease_holder == agent.identity
    refused, accepted = fake.hellos
    assert fake.connections[0].close_code == 4409
    assert accepted.fencing_epoch > refused.fencing_epoch >= 1
    assert any("stepping back to FOLLOWER" in m for m in messages(logs, logging.ERROR))
    assert store.record is not None
    assert store.record.holder == "", "released on stop"


@pytest.mark.asyncio
async def test_stale_epoch_without_ha_keeps_retrying(logs: pytest.LogCaptureFixture) -> None:
    """4409 without HA: logged (turn HA on), retried with backoff."""
    async with FakeControlPlane(token=TOKEN) as fake:
        fake.refuse_registration(4409, times=2)
        async with running(make_agent(fake)):
            await fake.wait_registered()
    assert [c.close_code for c in fake.connections[:2]] == [4409, 4409]
    assert [h.fencing_epoch for h in fake.hellos] == [0, 0, 0]
    assert sum("ENABLE_HA" in m for m in messages(logs, logging.ERROR)) == 2


@pytest.mark.asyncio
async def test_duplicate_refusal_is_logged_and_retried(logs: pytest.LogCaptureFixture) -> None:
    """4429: another live process holds this AGENT_ID; logged, retried, and the hello
    carries the platform's scope so the control plane can tell the two apart."""
    async with FakeControlPlane(token=TOKEN) as fake:
        fake.refuse_registration(4429, "already connected from another process", times=1)
        agent = make_agent(fake)
        async with running(agent):
            await fake.wait_registered()
    assert fake.connections[0].close_code == 4429
    assert {h.instance_id for h in fake.hellos} == {agent.platform.instance_scope()}
    assert any(
        "another agent process with the same AGENT_ID (agent-1) is connected" in m
        for m in messages(logs, logging.ERROR)
    )


@pytest.mark.asyncio
async def test_superseded_is_logged(logs: pytest.LogCaptureFixture) -> None:
    """Close 4000 says another process with this AGENT_ID connected; the agent waits the cap."""
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake)):
        await fake.wait_registered()
        await fake.drop(4000, "superseded by a newer connection")
        await fake.wait_registered(2)
    assert any(
        "another agent process with the same AGENT_ID (agent-1) connected" in m
        for m in messages(logs, logging.ERROR)
    )


@pytest.mark.asyncio
async def test_malformed_server_frames_do_not_crash(logs: pytest.LogCaptureFixture) -> None:
    """Bad frames are answered with error frames; the connection and the agent carry on."""
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(fake)
        async with running(agent):
            conn = await fake.wait_registered()
            for bad in (
                "not json",
                "[1, 2]",
                '{"no": "type"}',
                '{"type": "session.teleport"}',
                '{"type": "command", "command_id": "c", "session_id": "s", "generation": 1, '
                '"action": "start"}',
                b"\x01\x00\x00\x00\x07vnc bytes",
            ):
                await fake.send(bad)
            await fake.send(Heartbeat())  # valid, but not for an agent
            await fake.send(Error(code="invalid", message="bad heartbeat", ref="agent.heartbeat"))
            await fake.send(VncOpen(stream_id=7, session_id="s1"))
            vnc = await fake.next_frame(VncClose)
            errors = [await fake.next_frame(Error) for _ in range(6)]
            await fake.command("start", "s1")
            assert (await fake.next_frame(CommandResult)).ok
            assert fake.current is conn
            assert agent.registered
    assert [e.code for e in errors] == [
        "not_json",
        "not_object",
        "missing_type",
        "unknown_type",
        "invalid",
        "unexpected",
    ]
    assert vnc.stream_id == 7
    assert any("bad heartbeat" in m for m in messages(logs, logging.WARNING))


@pytest.mark.asyncio
async def test_shutdown_frame_reconnects_after_the_hint(logs: pytest.LogCaptureFixture) -> None:
    """A control plane going away says when to come back; the agent does."""
    async with FakeControlPlane(token=TOKEN) as fake, running(make_agent(fake)):
        await fake.wait_registered()
        await fake.shutdown("rolling update", reconnect_after_s=0.02)
        await fake.wait_registered(2)
    assert any("shutting down (rolling update)" in m for m in messages(logs))


@pytest.mark.asyncio
async def test_health_and_ready_follow_the_registration() -> None:
    """/health answers while the process runs; /ready only while registered."""
    port = free_port()
    async with FakeControlPlane(token=TOKEN) as fake:
        fake.refuse_http(503, times=None)
        agent = make_agent(fake, health_port=port, health_host="127.0.0.1")
        async with running(agent):
            await fake.wait_for(lambda: bool(fake.http_refusals))
            assert agent.health_port == port
            assert await http_get(port, "/health") == (200, {"status": "healthy"})
            status, body = await http_get(port, "/ready")
            assert (status, body["status"]) == (503, "not ready")
            assert "HTTP 503" in body["reason"] or "connect" in body["reason"]
            fake.stop_refusing()
            conn = await fake.wait_registered()
            status, body = await http_get(port, "/ready")
            assert status == 200
            assert body == {
                "agent_id": "agent-1",
                "status": "ready",
                "role": "standalone",
                "connection_id": conn.conn_id,
            }
            fake.refuse_http(503, times=None)
            refused = len(fake.http_refusals)
            await fake.drop()
            await fake.wait_for(lambda: len(fake.http_refusals) > refused)
            status, body = await http_get(port, "/ready")
            assert status == 503
            # Between attempts the reason is the refusal; during one, the dial.
            assert "HTTP 503" in body["reason"] or "connecting to" in body["reason"]
            assert (await http_get(port, "/nope"))[0] == 404
    with pytest.raises(ConnectionRefusedError):
        await http_get(port, "/health")


@pytest.mark.asyncio
async def test_health_port_in_use_is_a_config_error() -> None:
    """A HEALTH_PORT another process holds fails at start, naming the variable."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with FakeControlPlane(token=TOKEN) as fake:
            agent = make_agent(fake, health_port=port, health_host="127.0.0.1")
            with pytest.raises(
                ConfigError, match=f"HEALTH_PORT: cannot listen on 127.0.0.1:{port}"
            ):
                await agent.serve()


class UnreachablePlatform(MemoryPlatform):
    """A platform whose check fails, as the docker platform's does with no engine."""

    async def check(self) -> None:
        raise PlatformError("the engine at unix:///nowhere did not answer")


@pytest.mark.asyncio
async def test_a_failing_platform_check_stops_the_agent_before_it_connects() -> None:
    """The agent checks its platform first: a platform that cannot run sessions stops it
    with the platform's reason, and the control plane never sees it."""
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(fake, UnreachablePlatform(agent_id="agent-1"))
        with pytest.raises(PlatformError, match="unix:///nowhere did not answer"):
            await agent.serve()
        assert fake.connections == []


# -- shutting down ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stop_leaves_sessions_running_and_releases_the_lease() -> None:
    """SIGTERM's path: finish commands, send shutdown, close, release the lease, keep sessions."""
    state = MemoryPlatformState()
    store = MemoryLeaseStore()
    platform = GatedPlatform(agent_id="agent-1", state=state)
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(fake, platform, lease=MemoryLease(store=store), **HA)
        task = asyncio.create_task(agent.serve())
        conn = await fake.wait_registered()
        await fake.command("start", "s1")
        await fake.next_frame(CommandResult)
        gate = platform.close_gate("s2")
        in_flight = await fake.command("start", "s2")
        await platform.wait_until(lambda: ("start", "s2") in platform.entered)
        agent.request_stop()  # what the SIGTERM handler does
        late = await fake.command("start", "s3")  # arrives while stopping: not taken
        assert agent.readiness() == (
            False,
            {"agent_id": "agent-1", "status": "not ready", "reason": "the agent is stopping"},
        )
        gate.set()
        await agent.stop()
        await task
        await fake.wait_closed(conn)
    kinds = [f.type for f in conn.frames if not isinstance(f, Heartbeat | SessionStatusReport)]
    assert kinds[-2:] == ["command.result", "shutdown"]
    assert fake.frames_of(CommandResult)[-1].command_id == in_flight.command_id
    assert late.command_id not in [a.command_id for a in fake.frames_of(CommandAck)]
    assert conn.close_code == 1001
    assert state.sessions.keys() == {"s1", "s2"}
    assert all(s.state == "running" for s in state.sessions.values())
    assert store.record is not None
    assert store.record.holder == ""


@pytest.mark.asyncio
async def test_stop_abandons_commands_after_the_drain_timeout() -> None:
    """A command that outlasts the drain timeout is abandoned; the agent still stops."""
    platform = GatedPlatform(agent_id="agent-1")
    platform.close_gate("s1")
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(fake, platform)
        agent.drain_timeout_s = 0.05
        task = asyncio.create_task(agent.serve())
        conn = await fake.wait_registered()
        await fake.command("start", "s1")
        await platform.wait_until(lambda: bool(platform.entered))
        await agent.stop()
        await task
        await fake.wait_closed(conn)
    assert fake.frames_of(CommandResult) == []
    assert len(fake.frames_of(Shutdown)) == 1
    assert agent.commands_in_flight == 0


@pytest.mark.asyncio
async def test_run_handles_sigterm_in_a_real_process() -> None:
    """``Agent.run()`` in its own process: SIGTERM sends shutdown and exits 0."""
    script = textwrap.dedent(
        """
        import sys
        from streamspace_sdk import Agent, AgentSettings
        from streamspace_sdk.testing import MemoryPlatform

        settings = AgentSettings(
            agent_id="agent-1", control_plane_url=sys.argv[1], agent_token=sys.argv[2],
            health_port=0,
        )
        Agent(settings, platform=MemoryPlatform(agent_id="agent-1")).run()
        """
    )
    async with FakeControlPlane(token=TOKEN) as fake:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            fake.url,
            TOKEN,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            conn = await fake.wait_registered(timeout_s=20)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                _, err = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await fake.wait_closed(conn)
    text = err.decode()
    assert process.returncode == 0, text
    assert "Received SIGTERM; shutting down" in text
    assert "INFO: Registering agent with Control Plane" in text
    assert "INFO: Agent registered successfully: agent-1" in text
    assert [f.type for f in conn.frames][-1] == "shutdown"


# -- high availability ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_only_the_leader_connects_and_a_follower_takes_over() -> None:
    """Two replicas of one AGENT_ID: the leader connects; when it stops, the other does."""
    store = MemoryLeaseStore()
    state = MemoryPlatformState()
    async with FakeControlPlane(token=TOKEN) as fake:
        first = make_agent(
            fake,
            MemoryPlatform(agent_id="agent-1", state=state),
            lease=MemoryLease(store=store),
            **HA,
        )
        second = make_agent(
            fake,
            MemoryPlatform(agent_id="agent-1", state=state),
            lease=MemoryLease(store=store),
            **HA,
        )
        first_task = asyncio.create_task(first.serve())
        leader = await fake.wait_registered()
        await fake.command("start", "s1")
        await fake.next_frame(CommandResult)
        async with running(second):
            await eventually(
                lambda: second.elector is not None and second.elector.leader == first.identity
            )
            ready, body = second.readiness()
            assert ready
            assert body["role"] == "follower"
            assert body["leader"] == first.identity
            assert len(fake.connections) == 1, "a follower does not connect"
            await first.stop()
            await first_task
            successor = await fake.wait_registered(2)
            assert leader.closed
    assert leader.hello is not None
    assert successor.hello is not None
    assert leader.hello.lease_holder == first.identity
    assert successor.hello.lease_holder == second.identity
    assert successor.hello.fencing_epoch > leader.hello.fencing_epoch
    assert [s.session_id for s in successor.hello.sessions] == ["s1"], "adopted"
    assert len(fake.connections) == 2


@pytest.mark.asyncio
async def test_losing_the_lease_closes_the_socket_and_sessions_keep_running() -> None:
    """A leader whose lease is taken disconnects at once, follows, and leads again later."""
    store = MemoryLeaseStore()
    state = MemoryPlatformState()
    platform = MemoryPlatform(agent_id="agent-1", state=state)
    async with FakeControlPlane(token=TOKEN) as fake:
        agent = make_agent(fake, platform, lease=MemoryLease(store=store), **HA)
        async with running(agent):
            first = await fake.wait_registered()
            await fake.command("start", "s1")
            await fake.next_frame(CommandResult)
            intruder = MemoryLease(store=store)
            held = store.record
            assert held is not None
            store.record = held.model_copy(
                update={"holder": "intruder", "expires_at": held.expires_at + timedelta(minutes=1)}
            )
            await fake.wait_closed(first)
            await eventually(lambda: agent.readiness()[1].get("leader") == "intruder")
            assert agent.readiness()[0], "a healthy follower is ready"
            await intruder.release("intruder")
            second = await fake.wait_registered(2)
    assert state.sessions["s1"].state == "running"
    assert first.hello is not None
    assert second.hello is not None
    assert second.hello.fencing_epoch > first.hello.fencing_epoch


HA_TIMINGS = {k: v for k, v in HA.items() if k != "ha_backend"}


def leases_installed(monkeypatch: pytest.MonkeyPatch, *installed: type) -> list[str]:
    """Make the ``streamspace.leases`` group hold only ``installed``; return the names asked for.

    Whatever lease plugins this environment has, the agent then finds exactly these.
    """
    asked: list[str] = []
    real = drivers.load_driver

    def load_driver(group: str, name: str, /, *args: Any, **kwargs: Any) -> Any:
        if group == drivers.LEASES:
            asked.append(name)
            kwargs["extensions"] = list(installed)
        return real(group, name, *args, **kwargs)

    monkeypatch.setattr(drivers, "load_driver", load_driver)
    return asked


class FileLease(MemoryLease):
    """Stands in for streamspace-lease-file's ``file`` driver."""

    name = "file"


class KubernetesLease(MemoryLease):
    """Stands in for streamspace-k8s's ``kubernetes`` lease."""

    name = "kubernetes"


@pytest.mark.parametrize(
    ("platform", "backend", "lease_class"),
    [("process", "file", FileLease), ("kubernetes", "kubernetes", KubernetesLease)],
)
def test_ha_backend_unset_takes_the_default_and_logs_it(
    monkeypatch: pytest.MonkeyPatch,
    logs: pytest.LogCaptureFixture,
    platform: str,
    backend: str,
    lease_class: type[MemoryLease],
) -> None:
    """ENABLE_HA=true alone (as the seed's Kubernetes manifest) loads the default lease:
    ``kubernetes`` with PLATFORM=kubernetes, else ``file``, and the log says it was the
    default."""
    asked = leases_installed(monkeypatch, FileLease, KubernetesLease)
    settings = AgentSettings(
        agent_id="agent-1", control_plane_url="ws://cp", platform=platform, **HA_TIMINGS
    )
    agent = Agent(settings, MemoryPlatform(agent_id="agent-1"), hooks=no_plugins())
    assert asked == [backend]
    assert type(agent.lease) is lease_class
    assert agent.elector is not None
    said = [m for m in messages(logs) if "lease backend" in m]
    assert said == [
        f"High availability: lease backend {backend}, the default with PLATFORM={platform} "
        "(set HA_BACKEND to choose another)"
    ]


def test_ha_backend_set_is_logged_as_set(
    monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    asked = leases_installed(monkeypatch, MemoryLease, FileLease)
    settings = AgentSettings(
        agent_id="agent-1", control_plane_url="ws://cp", platform="kubernetes", **HA
    )
    agent = Agent(settings, MemoryPlatform(agent_id="agent-1"), hooks=no_plugins())
    assert asked == ["memory"]
    assert type(agent.lease) is MemoryLease
    assert [m for m in messages(logs) if "lease backend" in m] == [
        "High availability: lease backend memory (HA_BACKEND)"
    ]


@pytest.mark.parametrize(
    ("platform", "backend", "package"),
    [
        ("process", "file", "streamspace-lease-file"),
        ("kubernetes", "kubernetes", "streamspace-k8s"),
    ],
)
def test_default_ha_backend_not_installed_names_the_package(
    monkeypatch: pytest.MonkeyPatch, platform: str, backend: str, package: str
) -> None:
    """A default lease driver that is not installed fails saying it was HA_BACKEND's
    default and which package to pip install."""
    leases_installed(monkeypatch, MemoryLease)
    settings = AgentSettings(
        agent_id="agent-1", control_plane_url="ws://cp", platform=platform, **HA_TIMINGS
    )
    with pytest.raises(DriverNotFound) as caught:
        Agent(settings, MemoryPlatform(agent_id="agent-1"), hooks=no_plugins())
    message = str(caught.value)
    assert f"no 'streamspace.leases' driver named {backend!r} is installed" in message
    assert f"HA_BACKEND is unset, and {backend} is its default with PLATFORM={platform}" in (
        message
    )
    assert f"pip install {package}" in message
    assert "installed: memory" in message


# -- command line -------------------------------------------------------------------------------


def test_cli_run_with_ha_and_no_lease_plugin_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """``ENABLE_HA=true`` without HA_BACKEND or the file lease installed: exit 2, naming
    HA_BACKEND and the package to install."""
    leases_installed(monkeypatch, MemoryLease)
    monkeypatch.setenv("AGENT_ID", "agent-1")
    monkeypatch.setenv("CONTROL_PLANE_URL", "ws://127.0.0.1:9")
    monkeypatch.setenv("ENABLE_HA", "true")
    monkeypatch.setenv("PROCESS_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMSPACE_LOAD_PLUGINS", "")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no 'streamspace.leases' driver named 'file' is installed")
    assert "HA_BACKEND is unset" in err
    assert "pip install streamspace-lease-file" in err


def test_cli_run_with_a_bad_variable_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``streamspace-agent run`` names the bad variable and exits 2."""
    monkeypatch.setenv("AGENT_ID", "not a valid id")
    monkeypatch.setenv("CONTROL_PLANE_URL", "ws://127.0.0.1:9")
    assert main(["run"]) == 2
    assert capsys.readouterr().err.startswith("error: AGENT_ID: ")


def test_cli_run_with_a_missing_platform_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PLATFORM that is not installed is DriverNotFound's message and exit 2."""
    monkeypatch.setenv("AGENT_ID", "agent-1")
    monkeypatch.setenv("CONTROL_PLANE_URL", "ws://127.0.0.1:9")
    monkeypatch.setenv("PLATFORM", "no-such-platform")
    monkeypatch.setenv("STREAMSPACE_LOAD_PLUGINS", "")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "no 'streamspace.platforms' driver named 'no-such-platform'" in err
    assert "process" in err, "the message lists what is installed"
