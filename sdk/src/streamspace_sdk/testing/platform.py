"""``PlatformConformance``: what every platform driver must do."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import pytest
import pytest_asyncio

from streamspace_sdk.errors import PlatformError, StaleGeneration
from streamspace_sdk.platform import (
    LABEL_AGENT_ID,
    LABEL_MANAGED_BY,
    LABEL_SESSION_ID,
    MANAGED_BY,
    Platform,
    SessionSpec,
    SessionState,
    SessionStatus,
)
from streamspace_sdk.testing.base import BaseConformance
from streamspace_sdk.testing.rfb import read_screen_tcp

__all__ = ["HomeProbe", "PlatformConformance", "PlatformFactory", "SpecFactory"]

PlatformFactory = Callable[[], Platform]
"""Builds a new platform object over the same host or cluster, as a restarted agent would."""

SpecFactory = Callable[[str, int], SessionSpec]
"""Builds a runnable spec for ``(session_id, generation)`` on this platform."""


class HomeProbe(Protocol):
    """Reads and writes files in a running session's home directory, for the home tests.

    A driver's test class returns one from its ``home_probe`` fixture: for a local platform
    it writes under the path the status reports; for containers it may exec into the session.
    """

    async def write(self, platform: Platform, session_id: str, name: str, content: str) -> None:
        """Write ``content`` to the file ``name`` in the session's home."""

    async def read(self, platform: Platform, session_id: str, name: str) -> str | None:
        """Return the content of ``name`` in the session's home, or ``None`` if it is absent."""


_ids = itertools.count(1)


class PlatformConformance(BaseConformance):
    """Tests for a platform driver. Subclass it and provide ``platform_factory``.

    ``platform_factory()`` returns a new :class:`Platform` object managing the same sessions
    each call (a restarted agent). Override ``session_spec_factory`` when the default spec (no
    image, no command) cannot run on your platform, and ``start_timeout_s`` when starts are
    slow. Capabilities gate the hibernate and adoption tests. Optional fixtures enable more:
    ``failing_spec`` (a start that must fail) and ``home_probe`` (see :class:`HomeProbe`).
    """

    start_timeout_s: float = 60.0
    """How long a started session may take to report ``running``."""

    capacity_fill_limit: int = 16
    """The capacity test fills the platform only when ``max_sessions`` is at most this, so
    set a small ``MAX_SESSIONS`` in ``platform_factory`` (or raise this) to run it."""

    @pytest.fixture
    def platform_factory(self) -> PlatformFactory:
        """Return the factory under test. Required: override it in your test class."""
        pytest.fail(
            "PlatformConformance needs a `platform_factory` fixture returning a callable "
            "() -> Platform over one shared host"
        )

    @pytest.fixture
    def session_spec_factory(self) -> SpecFactory:
        """Return a spec builder; override it with an image or command your platform runs."""

        def make(session_id: str, generation: int) -> SessionSpec:
            return SessionSpec(
                session_id=session_id, generation=generation, user="conformance", template="t"
            )

        return make

    @pytest_asyncio.fixture
    async def platform(self, platform_factory: PlatformFactory) -> AsyncIterator[Platform]:
        """A platform object; every session the test started is stopped afterwards."""
        platform = platform_factory()
        yield platform
        for status in await platform.list_sessions():
            if status.session_id.startswith("conf-"):
                await platform.stop(status.session_id, status.generation + 1)
        await platform.close()

    @pytest.fixture
    def new_id(self) -> Callable[[], str]:
        """Return fresh session ids, unique within the test run."""
        return lambda: f"conf-{next(_ids)}-{time.monotonic_ns() % 100_000}"

    async def wait_state(
        self, platform: Platform, session_id: str, states: set[SessionState]
    ) -> SessionStatus:
        """Poll the platform until the session is in one of ``states``; fail on timeout."""
        deadline = time.monotonic() + self.start_timeout_s
        status = await platform.status(session_id)
        while status is None or status.state not in states:
            if time.monotonic() > deadline:
                pytest.fail(f"session {session_id} did not reach {states}; last: {status}")
            await asyncio.sleep(0.05)  # the platform is observed, it cannot notify us
            status = await platform.status(session_id)
        return status

    @pytest.mark.asyncio
    async def test_start_reaches_running_with_labels(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: start brings a session to ``running``, labelled with the standard labels.

        Troubleshooting: return ``starting`` from ``_start`` if the platform is slow, and make
        ``_status`` report ``running`` once the VNC server answers.
        """
        sid = new_id()
        first = await platform.start(session_spec_factory(sid, 1))
        assert first.session_id == sid
        assert first.generation == 1
        assert first.state in ("starting", "running")
        status = await self.wait_state(platform, sid, {"running"})
        assert status.generation == 1
        labelled = platform.labelled(session_spec_factory(sid, 1)).labels
        assert labelled[LABEL_SESSION_ID] == sid
        assert labelled[LABEL_AGENT_ID] == platform.agent_id
        assert labelled[LABEL_MANAGED_BY] == MANAGED_BY

    @pytest.mark.asyncio
    async def test_start_is_idempotent(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: the same (session, generation) started twice, even at once, is one session.

        Troubleshooting: the base class serialises calls per session and skips a generation
        already applied; ``_status`` must report the generation ``_start`` was given.
        """
        sid = new_id()
        spec = session_spec_factory(sid, 1)
        await asyncio.gather(platform.start(spec), platform.start(spec))
        await platform.start(spec)
        sessions = [s for s in await platform.list_sessions() if s.session_id == sid]
        assert len(sessions) == 1, f"expected one session {sid}, found {sessions}"

    @pytest.mark.asyncio
    async def test_stale_generation_is_refused(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: a command older than the applied generation raises ``StaleGeneration``.

        Troubleshooting: ``_status`` must report the generation of the last applied command.
        """
        sid = new_id()
        await platform.start(session_spec_factory(sid, 2))
        with pytest.raises(StaleGeneration):
            await platform.stop(sid, 1)

    @pytest.mark.asyncio
    async def test_stop_unknown_session_is_noop(
        self, platform: Platform, new_id: Callable[[], str]
    ) -> None:
        """Contract: stopping a session the platform does not know reports ``stopped``.

        Troubleshooting: redelivered stop commands must succeed; do not raise for "not found".
        """
        status = await platform.stop(new_id(), 1)
        assert status.state == "stopped"

    @pytest.mark.asyncio
    async def test_status_after_stop(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: after stop the session is gone (``None``) or reports ``stopped``.

        Troubleshooting: ``_stop`` must remove the compute before it returns.
        """
        sid = new_id()
        await platform.start(session_spec_factory(sid, 1))
        await self.wait_state(platform, sid, {"running"})
        stopped = await platform.stop(sid, 2)
        assert stopped.state == "stopped"
        after = await platform.status(sid)
        assert after is None or after.state == "stopped"
        again = await platform.stop(sid, 2)
        assert again.state == "stopped", "a repeated stop must be harmless"

    @pytest.mark.asyncio
    async def test_adopt_after_recreate(
        self,
        platform: Platform,
        platform_factory: PlatformFactory,
        session_spec_factory: SpecFactory,
        new_id: Callable[[], str],
    ) -> None:
        """Contract: a new platform object lists the sessions an earlier one started.

        Troubleshooting: find sessions by the ``streamspace.io/agent-id`` label (or your
        state directory), not by memory of the process that started them.
        """
        self.require(platform.capabilities, "adopt")
        sid = new_id()
        await platform.start(session_spec_factory(sid, 1))
        await self.wait_state(platform, sid, {"running"})
        reborn = platform_factory()
        try:
            listed = {s.session_id: s for s in await reborn.list_sessions()}
            assert sid in listed, f"{sid} not adopted; listed {sorted(listed)}"
            assert listed[sid].generation == 1
        finally:
            await reborn.close()

    @pytest.mark.asyncio
    async def test_hibernate_then_wake(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: hibernate reports ``hibernated``; wake brings the session back running.

        Troubleshooting: keep the session's storage in ``_hibernate``; ``_wake`` reuses it.
        """
        self.require(platform.capabilities, "hibernate")
        sid = new_id()
        await platform.start(session_spec_factory(sid, 1))
        await self.wait_state(platform, sid, {"running"})
        assert (await platform.hibernate(sid, 2)).state == "hibernated"
        assert (await platform.hibernate(sid, 2)).state == "hibernated"
        await platform.wake(session_spec_factory(sid, 3))
        status = await self.wait_state(platform, sid, {"running"})
        assert status.generation == 3

    @pytest.mark.asyncio
    async def test_vnc_endpoint_answers_rfb(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: a running session's VNC endpoint greets with an RFB protocol banner.

        Troubleshooting: report ``running`` only once the VNC server accepts connections, and
        return an address the agent itself can reach.
        """
        sid = new_id()
        await platform.start(session_spec_factory(sid, 1))
        await self.wait_state(platform, sid, {"running"})
        endpoint = await platform.vnc_endpoint(sid)
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        try:
            banner = await asyncio.wait_for(reader.readexactly(12), self.start_timeout_s)
        finally:
            writer.close()
            await writer.wait_closed()
        assert banner.startswith(b"RFB "), banner
        assert banner.endswith(b"\n"), banner

    @pytest.mark.asyncio
    async def test_vnc_endpoint_serves_the_screen(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: a viewer offering security type None reads the whole screen from a
        running session's VNC endpoint (pixels in the format it asks for, Raw encoding).

        Troubleshooting: the control plane authenticates viewers itself and relays their
        bytes unchanged, so the VNC server must offer security type None (Xvnc:
        ``-SecurityTypes None``; QEMU: ``-vnc`` without ``password``) and Raw encoding.
        """
        sid = new_id()
        await platform.start(session_spec_factory(sid, 1))
        await self.wait_state(platform, sid, {"running"})
        endpoint = await platform.vnc_endpoint(sid)
        screen = await read_screen_tcp(endpoint.host, endpoint.port, timeout_s=self.start_timeout_s)
        assert screen.width > 0
        assert screen.height > 0
        assert len(screen.pixels) == 4 * screen.width * screen.height

    @pytest.mark.asyncio
    async def test_capacity_is_reported(self, platform: Platform) -> None:
        """Contract: capacity says how many sessions the platform accepts; usage counts them.

        Troubleshooting: derive ``max_sessions`` from ``MAX_SESSIONS`` and what the platform
        itself can hold.
        """
        capacity = await platform.capacity()
        usage = await platform.usage()
        assert capacity.max_sessions >= 1
        assert 0 <= usage.sessions <= capacity.max_sessions

    @pytest.mark.asyncio
    async def test_failed_start_raises_with_reason(
        self,
        platform: Platform,
        failing_spec: SessionSpec | None,
    ) -> None:
        """Contract: a start that cannot work raises ``PlatformError`` with a reason and
        leaves nothing behind.

        Troubleshooting: clean up whatever ``_start`` created before raising; provide a
        ``failing_spec`` fixture (e.g. an image or command that does not exist).
        """
        if failing_spec is None:
            pytest.skip("no failing_spec fixture for this driver")
        with pytest.raises(PlatformError) as caught:
            await platform.start(failing_spec)
        assert str(caught.value), "the error must say why"
        status = await platform.status(failing_spec.session_id)
        assert status is None or status.state in ("failed", "stopped")

    @pytest.fixture
    def failing_spec(self) -> SessionSpec | None:
        """A spec whose start must fail; ``None`` skips that test."""
        return None

    @pytest.fixture
    def home_probe(self) -> HomeProbe | None:
        """A :class:`HomeProbe` for the session's home; ``None`` skips the home tests."""
        return None

    @pytest.mark.asyncio
    async def test_failed_start_leaves_nothing_behind(
        self,
        platform: Platform,
        failing_spec: SessionSpec | None,
        session_spec_factory: SpecFactory,
    ) -> None:
        """Contract: a failed start holds no capacity and leaves no session; the same id
        starts normally with the next generation.

        Troubleshooting: on any error in ``_start``, remove what it created (processes,
        containers, records) before raising, and do not count it in ``usage``.
        """
        if failing_spec is None:
            pytest.skip("no failing_spec fixture for this driver")
        before = await platform.usage()
        with pytest.raises(PlatformError):
            await platform.start(failing_spec)
        assert (await platform.usage()).sessions == before.sessions
        active = [
            s
            for s in await platform.list_sessions()
            if s.session_id == failing_spec.session_id and s.state in ("starting", "running")
        ]
        assert not active, f"a failed start left {active}"
        sid = failing_spec.session_id
        await platform.start(session_spec_factory(sid, failing_spec.generation + 1))
        status = await self.wait_state(platform, sid, {"running"})
        assert status.generation == failing_spec.generation + 1

    @pytest.mark.asyncio
    async def test_capacity_is_honoured(
        self, platform: Platform, session_spec_factory: SpecFactory, new_id: Callable[[], str]
    ) -> None:
        """Contract: once ``max_sessions`` sessions run, another start raises
        ``PlatformError`` and starts nothing; stopping one makes room again.

        Troubleshooting: count starting and running sessions (not hibernated ones) in
        ``_start`` before creating anything, under a lock so concurrent starts cannot both
        take the last place. The test runs when ``max_sessions`` is at most
        ``capacity_fill_limit``.
        """
        capacity = await platform.capacity()
        if capacity.max_sessions > self.capacity_fill_limit:
            pytest.skip(
                f"max_sessions is {capacity.max_sessions}; make platform_factory's capacity at "
                f"most capacity_fill_limit ({self.capacity_fill_limit}) to fill it"
            )
        if capacity.max_sessions == 0:
            pytest.skip("max_sessions is 0")
        room = capacity.max_sessions - (await platform.usage()).sessions
        started = [new_id() for _ in range(room)]
        for sid in started:
            await platform.start(session_spec_factory(sid, 1))
        for sid in started:
            await self.wait_state(platform, sid, {"running"})
        extra = new_id()
        with pytest.raises(PlatformError):
            await platform.start(session_spec_factory(extra, 1))
        status = await platform.status(extra)
        assert status is None or status.state in ("failed", "stopped"), status
        assert (await platform.usage()).sessions == capacity.max_sessions
        if started:
            await platform.stop(started[0], 2)
            await platform.start(session_spec_factory(extra, 2))
            await self.wait_state(platform, extra, {"running"})

    @pytest.mark.asyncio
    async def test_adopted_session_can_be_stopped(
        self,
        platform: Platform,
        platform_factory: PlatformFactory,
        session_spec_factory: SpecFactory,
        new_id: Callable[[], str],
    ) -> None:
        """Contract: a new platform object manages what an earlier one started: it reports
        it running with its VNC endpoint, and stops it.

        Troubleshooting: keep everything ``_status``, ``_vnc_endpoint`` and ``_stop`` need
        on the platform (labels, a state file), not in the object that started the session.
        """
        self.require(platform.capabilities, "adopt")
        sid = new_id()
        await platform.start(session_spec_factory(sid, 1))
        await self.wait_state(platform, sid, {"running"})
        reborn = platform_factory()
        try:
            status = await reborn.status(sid)
            assert status is not None, f"a new platform object does not see {sid}"
            assert status.state == "running", status
            assert (await reborn.vnc_endpoint(sid)) == (await platform.vnc_endpoint(sid))
            assert (await reborn.stop(sid, 2)).state == "stopped"
        finally:
            await reborn.close()
        after = await platform.status(sid)
        assert after is None or after.state == "stopped", after

    @pytest.mark.asyncio
    async def test_hibernate_wake_keeps_home(
        self,
        platform: Platform,
        session_spec_factory: SpecFactory,
        new_id: Callable[[], str],
        home_probe: HomeProbe | None,
    ) -> None:
        """Contract: a file written in the home before hibernate is there after wake.

        Troubleshooting: ``_hibernate`` drops compute only; ``_wake`` mounts the same
        volume or directory again, even when the session lands on a new port or node.
        """
        self.require(platform.capabilities, "hibernate")
        if home_probe is None:
            pytest.skip("no home_probe fixture for this driver")
        sid = new_id()
        await platform.start(session_spec_factory(sid, 1))
        await self.wait_state(platform, sid, {"running"})
        await home_probe.write(platform, sid, "conformance.txt", sid)
        await platform.hibernate(sid, 2)
        await platform.wake(session_spec_factory(sid, 3))
        await self.wait_state(platform, sid, {"running"})
        assert await home_probe.read(platform, sid, "conformance.txt") == sid

    @pytest.mark.asyncio
    async def test_persistent_home_outlives_session(
        self,
        platform: Platform,
        session_spec_factory: SpecFactory,
        new_id: Callable[[], str],
        home_probe: HomeProbe | None,
    ) -> None:
        """Contract: with ``persistent_home``, a file one session writes is in the home of the
        user's next session, after the first was stopped.

        Troubleshooting: name the persistent volume or directory after the user, not the
        session, and keep it in ``_stop``.
        """
        self.require(platform.capabilities, "persistent_home")
        if home_probe is None:
            pytest.skip("no home_probe fixture for this driver")
        first, second = new_id(), new_id()
        spec = session_spec_factory(first, 1).model_copy(update={"persistent_home": True})
        await platform.start(spec)
        await self.wait_state(platform, first, {"running"})
        await home_probe.write(platform, first, "conformance.txt", first)
        await platform.stop(first, 2)
        again = session_spec_factory(second, 1).model_copy(
            update={"persistent_home": True, "user": spec.user}
        )
        await platform.start(again)
        await self.wait_state(platform, second, {"running"})
        assert await home_probe.read(platform, second, "conformance.txt") == first
