"""The built-in ``process`` platform: the kit's suite against a real Xvnc, and its own promises.

Every test runs over a state directory in ``tmp_path``; the ``no_leftovers`` fixture then
kills (and fails the test for) any session process still running with a home under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from streamspace_sdk.drivers import PLATFORMS, load_driver_class
from streamspace_sdk.errors import ConfigError, PlatformError
from streamspace_sdk.platform import Platform, SessionSpec, SessionStatus
from streamspace_sdk.platforms import ProcessPlatform
from streamspace_sdk.platforms import process as process_module
from streamspace_sdk.testing import PlatformConformance, PlatformFactory
from streamspace_sdk.testing.platform import HomeProbe

AGENT = "process-test-agent"
HAVE_XVNC = shutil.which("Xvnc") is not None and shutil.which("xterm") is not None

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the platform reads /proc"),
]


@pytest.fixture
def _xvnc() -> None:
    """Fail, never skip, without a real Xvnc: the README's test command installs it."""
    if not HAVE_XVNC:
        pytest.fail("Xvnc or xterm missing: apt-get install tigervnc-standalone-server xterm")


needs_xvnc = pytest.mark.usefixtures("_xvnc")


# -- helpers ---------------------------------------------------------------------------------


def make_settings(state_dir: Path, **overrides: Any) -> ProcessPlatform.Settings:
    values: dict[str, Any] = {
        "process_state_dir": state_dir,
        "process_start_timeout": 15.0,
        "process_stop_timeout": 1.0,
        **overrides,
    }
    return ProcessPlatform.Settings(**values)


def spec(session_id: str, generation: int = 1, **fields: Any) -> SessionSpec:
    return SessionSpec(
        session_id=session_id, generation=generation, user="alice", template="t", **fields
    )


def session_processes(root: Path) -> list[int]:
    """Live processes whose HOME is under ``root`` (zombies have no environment to read)."""
    marker = f"HOME={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(marker) for item in environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def x_files_exist(display: int) -> bool:
    """Whether the lock file or socket of X display ``display`` is there."""
    return Path(f"/tmp/.X{display}-lock").exists() or Path(f"/tmp/.X11-unix/X{display}").exists()


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def live_group_members(pgid: int) -> list[str]:
    """Command lines of the live processes of group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def x_servers_on(display: int) -> list[str]:
    """Command lines of live processes serving (Xvnc) or using (DISPLAY) ``display``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        serves = b"Xvnc" in cmdline[0] and f":{display}".encode() in cmdline
        uses = f"DISPLAY=:{display}".encode() in environ
        if serves or uses:
            found.append(b" ".join(cmdline).decode(errors="replace"))
    return found


async def rfb_banner(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.readexactly(12), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def wait_for(
    platform: Platform, session_id: str, state: str, timeout_s: float = 10.0
) -> SessionStatus:
    """Poll ``status`` until ``state``: the platform observes processes, nothing notifies."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await platform.status(session_id)
        if status is not None and status.state == state:
            return status
        assert time.monotonic() < deadline, f"{session_id} never became {state}: {status}"
        await asyncio.sleep(0.02)


def meta_int(status: SessionStatus, key: str) -> int:
    value = status.platform_metadata[key]
    assert isinstance(value, int), status
    return value


def home_of(status: SessionStatus) -> Path:
    return Path(str(status.platform_metadata["home"]))


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Kill any session process left under ``tmp_path``, then fail the test if there was one."""
    yield
    leftovers = session_processes(tmp_path)
    for pid in leftovers:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            continue
    for pid in leftovers:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # supervisors are our children: do not leave zombies
    assert not leftovers, f"session processes left running: {leftovers}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest_asyncio.fixture
async def make_platform(
    state_dir: Path,
) -> AsyncIterator[Callable[..., ProcessPlatform]]:
    """Build platforms over ``state_dir``; stops every session they left at the end."""
    built: list[ProcessPlatform] = []

    def make(**overrides: Any) -> ProcessPlatform:
        platform = ProcessPlatform(make_settings(state_dir, **overrides), agent_id=AGENT)
        built.append(platform)
        return platform

    yield make
    if built:
        cleaner = ProcessPlatform(make_settings(state_dir), agent_id=AGENT)
        for status in await cleaner.list_sessions():
            await cleaner.stop(status.session_id, status.generation + 1)


class DirectoryHomeProbe:
    """Reads and writes the home directory the platform reports for a session."""

    async def write(self, platform: Platform, session_id: str, name: str, content: str) -> None:
        home = await self._home(platform, session_id)
        await asyncio.to_thread((home / name).write_text, content)

    async def read(self, platform: Platform, session_id: str, name: str) -> str | None:
        path = await self._home(platform, session_id) / name
        try:
            return await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            return None

    @staticmethod
    async def _home(platform: Platform, session_id: str) -> Path:
        status = await platform.status(session_id)
        assert status is not None, f"no session {session_id}"
        return home_of(status)


# -- the kit ---------------------------------------------------------------------------------


@needs_xvnc
class TestProcessPlatform(PlatformConformance):
    """The conformance suite against real Xvnc sessions (the default command)."""

    start_timeout_s = 20.0

    @pytest.fixture
    def platform_factory(self, state_dir: Path) -> PlatformFactory:
        settings = make_settings(state_dir, max_sessions=2)
        return lambda: ProcessPlatform(settings, agent_id=AGENT)

    @pytest.fixture
    def failing_spec(self, new_id: Callable[[], str]) -> SessionSpec:
        command = ["sh", "-c", "echo cannot start >&2; exit 3"]
        return SessionSpec(
            session_id=new_id(), generation=1, user="conformance", template="t", command=command
        )

    @pytest.fixture
    def home_probe(self) -> HomeProbe:
        return DirectoryHomeProbe()


# -- process-specific ------------------------------------------------------------------------


def test_entry_point_names_the_class() -> None:
    assert load_driver_class(PLATFORMS, "process") is ProcessPlatform


@needs_xvnc
@pytest.mark.asyncio
async def test_stop_kills_the_whole_group(make_platform: Callable[..., ProcessPlatform]) -> None:
    platform = make_platform()
    status = await platform.start(spec("s1"))
    assert status.state == "running"
    assert status.vnc is not None
    assert await rfb_banner(status.vnc.port) == b"RFB 003.008\n"
    pgid, display = meta_int(status, "pgid"), meta_int(status, "display")
    members = live_group_members(pgid)
    assert any("Xvnc" in m for m in members), members
    assert any("xterm" in m for m in members), members
    lock = Path(f"/tmp/.X{display}-lock")
    assert int(await asyncio.to_thread(lock.read_text)) == pgid, "the lock names the supervisor"

    assert (await platform.stop("s1", 2)).state == "stopped"

    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert x_servers_on(display) == []
    assert not x_files_exist(display)
    assert await platform.status("s1") is None
    assert not home_of(status).exists(), "a scratch home is removed at stop"


@needs_xvnc
@pytest.mark.asyncio
async def test_hibernate_and_wake_keep_the_home(
    make_platform: Callable[..., ProcessPlatform],
) -> None:
    platform = make_platform()
    first = await platform.start(spec("s1"))
    home = home_of(first)
    await asyncio.to_thread((home / "notes.txt").write_text, "kept")

    hibernated = await platform.hibernate("s1", 2)
    assert hibernated.state == "hibernated"
    assert hibernated.vnc is None
    assert group_gone(meta_int(first, "pgid"))
    observed = await platform.status("s1")
    assert observed is not None
    assert observed.state == "hibernated"

    woken = await platform.wake(spec("s1", 3))
    assert woken.state == "running"
    assert woken.generation == 3
    assert home_of(woken) == home
    assert meta_int(woken, "pgid") != meta_int(first, "pgid")
    assert await asyncio.to_thread((home / "notes.txt").read_text) == "kept"
    assert woken.vnc is not None
    assert (await rfb_banner(woken.vnc.port)).startswith(b"RFB ")


@needs_xvnc
@pytest.mark.asyncio
async def test_persistent_home_is_per_user_and_outlives_stop(
    make_platform: Callable[..., ProcessPlatform], state_dir: Path
) -> None:
    platform = make_platform()
    status = await platform.start(spec("s1", persistent_home=True))
    assert home_of(status) == state_dir / "homes" / "alice"
    await platform.stop("s1", 2)
    assert home_of(status).is_dir()

    root = state_dir / "elsewhere"
    other = make_platform(process_home_root=root)
    again = await other.start(spec("s2", persistent_home=True))
    assert home_of(again) == root / "alice"


@needs_xvnc
@pytest.mark.asyncio
async def test_new_platform_object_adopts_running_sessions(
    make_platform: Callable[..., ProcessPlatform],
) -> None:
    first = make_platform()
    started = await first.start(spec("s1", labels={"team": "a"}))

    reborn = make_platform()
    listed = {s.session_id: s for s in await reborn.list_sessions()}
    assert set(listed) == {"s1"}
    adopted = listed["s1"]
    assert adopted.state == "running"
    assert adopted.generation == 1
    assert adopted.vnc == started.vnc
    assert (await reborn.usage()).sessions == 1
    endpoint = await reborn.vnc_endpoint("s1")
    assert (await rfb_banner(endpoint.port)).startswith(b"RFB ")

    stranger = ProcessPlatform(first.config, agent_id="another-agent")
    assert await stranger.list_sessions() == []
    assert await stranger.status("s1") is None
    with pytest.raises(PlatformError, match="belongs to agent"):
        await stranger.start(spec("s1", 2))

    await reborn.stop("s1", 2)
    assert group_gone(meta_int(started, "pgid"))
    assert await first.status("s1") is None


@needs_xvnc
@pytest.mark.asyncio
async def test_dropped_platform_object_leaves_the_session_running(
    make_platform: Callable[..., ProcessPlatform],
) -> None:
    """An agent that dies without stopping anything (SIGKILL) leaves its sessions running."""
    platform = make_platform()
    started = await platform.start(spec("s1"))
    del platform
    gc.collect()  # nothing of the session may hang on the object (no ResourceWarning either)

    reborn = make_platform()
    status = await reborn.status("s1")
    assert status is not None
    assert status.state == "running"
    assert status.vnc is not None
    assert (await rfb_banner(status.vnc.port)).startswith(b"RFB ")
    await reborn.stop("s1", 2)
    assert group_gone(meta_int(started, "pgid"))


@needs_xvnc
@pytest.mark.asyncio
async def test_session_survives_sigkill_of_the_agent_process(
    state_dir: Path, make_platform: Callable[..., ProcessPlatform]
) -> None:
    """A real agent process started the session and was SIGKILLed; a new one adopts it."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from streamspace_sdk.platform import SessionSpec\n"
        "from streamspace_sdk.platforms import ProcessPlatform\n"
        "async def main():\n"
        "    settings = ProcessPlatform.Settings(process_state_dir=Path(sys.argv[1]))\n"
        f"    platform = ProcessPlatform(settings, agent_id={AGENT!r})\n"
        "    spec = SessionSpec(session_id='s1', generation=1, user='alice', template='t')\n"
        "    status = await platform.start(spec)\n"
        "    print(status.platform_metadata['pgid'], flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(state_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(agent.stdout.readline(), 30)
        pgid = int(line)
    finally:
        agent.kill()
        await agent.wait()

    platform = make_platform()
    status = await platform.status("s1")
    assert status is not None
    assert status.state == "running", status
    assert status.vnc is not None
    assert (await rfb_banner(status.vnc.port)).startswith(b"RFB ")
    await platform.stop("s1", 2)
    # The supervisor was the dead agent's child; init reaps it (or, in a container whose init
    # does not reap, it stays a zombie): nothing of the group runs.
    assert live_group_members(pgid) == []


@needs_xvnc
@pytest.mark.asyncio
async def test_externally_killed_session_reports_process_exited(
    make_platform: Callable[..., ProcessPlatform], state_dir: Path
) -> None:
    platform = make_platform()
    started = await platform.start(spec("s1"))
    pgid, display = meta_int(started, "pgid"), meta_int(started, "display")
    os.killpg(pgid, signal.SIGKILL)

    failed = await wait_for(platform, "s1", "failed")
    assert failed.detail == "process exited"
    assert failed.vnc is None
    assert [s.state for s in await platform.list_sessions()] == ["failed"]
    assert (await platform.usage()).sessions == 0
    adopted = await make_platform().status("s1")
    assert adopted is not None
    assert (adopted.state, adopted.detail) == ("failed", "process exited")

    assert (await platform.stop("s1", 2)).state == "stopped"
    assert await platform.status("s1") is None
    assert list((state_dir / "sessions").iterdir()) == []
    assert not x_files_exist(display), "the stale X socket is removed"


@needs_xvnc
@pytest.mark.asyncio
async def test_placeholders_and_environment(
    make_platform: Callable[..., ProcessPlatform], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_TOKEN", "do-not-leak")
    script = (
        'printf "%s\\n" "$@" > "$HOME/args.txt"; env > "$HOME/env.txt"; '
        'exec Xvnc ":$1" -rfbport "$2" -interface 127.0.0.1 -SecurityTypes None'
    )
    command = ["sh", "-c", script, "sh", "{display}", "{vnc_port}", "{home}", "{session_id}"]
    command.append("user={user}")
    platform = make_platform()
    status = await platform.start(spec("s1", command=command, env={"GREETING": "hello"}))
    assert status.state == "running"
    home = home_of(status)
    display, port = meta_int(status, "display"), meta_int(status, "vnc_port")
    args = (await asyncio.to_thread((home / "args.txt").read_text)).splitlines()
    assert args == [str(display), str(port), str(home), "s1", "user=alice"]
    env = dict(
        line.split("=", 1)
        for line in (await asyncio.to_thread((home / "env.txt").read_text)).splitlines()
        if "=" in line
    )
    assert env["HOME"] == str(home)
    assert env["USER"] == "alice"
    assert env["DISPLAY"] == f":{display}"
    assert env["GREETING"] == "hello"
    assert env["STREAMSPACE_SESSION_ID"] == "s1"
    assert "AGENT_TOKEN" not in env, "the agent's environment must not reach sessions"
    assert status.vnc is not None
    assert status.vnc.port == port


@needs_xvnc
@pytest.mark.asyncio
async def test_orphans_of_the_session_are_reaped(
    make_platform: Callable[..., ProcessPlatform], tmp_path: Path
) -> None:
    """A daemon the command leaves behind is the supervisor's to reap, not init's."""
    script = '(sleep 30 &); exec Xvnc ":$1" -rfbport "$2" -interface 127.0.0.1 -SecurityTypes None'
    platform = make_platform()
    command = ["sh", "-c", script, "sh", "{display}", "{vnc_port}"]
    status = await platform.start(spec("s1", command=command))
    pgid = meta_int(status, "pgid")
    sleepers = [p for p in session_processes(tmp_path) if _cmdline(p).startswith(b"sleep\0")]
    assert len(sleepers) == 1, sleepers
    assert _parent(sleepers[0]) == pgid, "the orphan is handed to the supervisor"
    await platform.stop("s1", 2)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


@pytest.mark.asyncio
async def test_missing_xvnc_names_the_debian_package(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    state_dir: Path,
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    platform = ProcessPlatform(
        ProcessPlatform.Settings(process_state_dir=state_dir), agent_id=AGENT
    )
    expected = (
        "Xvnc not found: install Debian's tigervnc-standalone-server "
        "(apt-get install tigervnc-standalone-server xterm)"
    )
    with pytest.raises(PlatformError) as caught:
        await platform.check()
    assert expected in str(caught.value)
    with pytest.raises(PlatformError) as caught:
        await platform.start(spec("s1"))
    assert expected in str(caught.value)
    assert await platform.status("s1") is None
    assert await platform.list_sessions() == []


@needs_xvnc
@pytest.mark.asyncio
async def test_missing_x_client_is_named_too(
    make_platform: Callable[..., ProcessPlatform], tmp_path: Path
) -> None:
    only_xvnc = tmp_path / "only-xvnc"
    only_xvnc.mkdir()
    (only_xvnc / "Xvnc").symlink_to(shutil.which("Xvnc") or "Xvnc")
    platform = make_platform(path=str(only_xvnc))
    with pytest.raises(PlatformError, match=r"xterm not found: install Debian's xterm"):
        await platform.check()
    await make_platform().check()  # and with the real PATH, all is there


@pytest.mark.asyncio
async def test_start_timeout_kills_everything_and_shows_output(
    make_platform: Callable[..., ProcessPlatform], state_dir: Path, tmp_path: Path
) -> None:
    # The shell and its sleep ignore SIGTERM, so stopping them needs SIGKILL.
    command = ["sh", "-c", "trap '' TERM; echo listening-never; sleep 60"]
    platform = make_platform(process_start_timeout=1.0, process_stop_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(PlatformError) as caught:
        await platform.start(spec("s1", command=command))
    message = str(caught.value)
    assert "did not answer with an RFB banner within 1s" in message
    assert "listening-never" in message
    assert time.monotonic() - started < 6
    assert session_processes(tmp_path) == []
    assert await platform.status("s1") is None
    assert list((state_dir / "sessions").iterdir()) == []
    assert list((state_dir / "logs").iterdir()) == []
    assert not (state_dir / "scratch" / "s1").exists()


@pytest.mark.asyncio
async def test_command_that_exits_reports_status_and_output(
    make_platform: Callable[..., ProcessPlatform], tmp_path: Path
) -> None:
    platform = make_platform()
    command = ["sh", "-c", "echo no display for {user} >&2; exit 3"]
    with pytest.raises(PlatformError) as caught:
        await platform.start(spec("s1", command=command))
    assert "exited with status 3" in str(caught.value)
    assert "no display for alice" in str(caught.value)
    assert session_processes(tmp_path) == []
    with pytest.raises(PlatformError, match="command not found: 'no-such-program'"):
        await platform.start(spec("s2", command=["no-such-program"]))


@needs_xvnc
@pytest.mark.asyncio
async def test_capacity_full(make_platform: Callable[..., ProcessPlatform]) -> None:
    platform = make_platform(max_sessions=1)
    assert (await platform.capacity()).max_sessions == 1
    await platform.start(spec("s1"))
    with pytest.raises(PlatformError, match="capacity full: 1 of 1 sessions"):
        await platform.start(spec("s2"))
    assert await platform.status("s2") is None
    await platform.hibernate("s1", 2)  # a hibernated session holds no place
    await platform.start(spec("s2"))
    with pytest.raises(PlatformError, match="capacity full"):
        await platform.wake(spec("s1", 3))
    hibernated = await platform.status("s1")
    assert hibernated is not None
    assert hibernated.state == "hibernated", "a failed wake keeps the session hibernated"


@needs_xvnc
@pytest.mark.asyncio
async def test_concurrent_starts_get_their_own_display_and_port(
    make_platform: Callable[..., ProcessPlatform], tmp_path: Path
) -> None:
    """Sessions started at once, by one agent or by two sharing the host, never share."""
    one = make_platform()
    two = make_platform(process_state_dir=tmp_path / "other-agent")
    started = await asyncio.gather(
        one.start(spec("s1")), one.start(spec("s2")), two.start(spec("s3")), two.start(spec("s4"))
    )
    assert {s.state for s in started} == {"running"}
    assert len({meta_int(s, "display") for s in started}) == 4
    assert len({meta_int(s, "vnc_port") for s in started}) == 4
    for status in started[2:]:
        await two.stop(status.session_id, 2)


@needs_xvnc
@pytest.mark.asyncio
async def test_taken_display_is_retried(
    make_platform: Callable[..., ProcessPlatform],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Another X server takes the display between choosing and binding: start again."""
    other = make_platform(process_state_dir=tmp_path / "other-state")
    busy = await other.start(spec("busy"))
    platform = make_platform()
    reserve = platform._reserve_display
    calls: list[set[int]] = []

    def first_collides(avoid: set[int]) -> int:
        calls.append(set(avoid))
        return meta_int(busy, "display") if len(calls) == 1 else reserve(avoid)

    monkeypatch.setattr(platform, "_reserve_display", first_collides)
    status = await platform.start(spec("s1"))
    assert status.state == "running"
    assert calls == [set(), {meta_int(busy, "display")}], "the taken display is avoided"
    assert meta_int(status, "display") != meta_int(busy, "display")
    assert busy.vnc is not None
    assert (await rfb_banner(busy.vnc.port)).startswith(b"RFB "), "the other server is intact"
    await other.stop("busy", 2)


@needs_xvnc
@pytest.mark.asyncio
async def test_newer_generation_of_a_running_session_keeps_it(
    make_platform: Callable[..., ProcessPlatform],
) -> None:
    platform = make_platform()
    first = await platform.start(spec("s1"))
    again = await platform.start(spec("s1", 2))
    assert again.generation == 2
    assert again.state == "running"
    assert meta_int(again, "pid") == meta_int(first, "pid")


@pytest.mark.asyncio
async def test_unreadable_records_are_ignored(
    make_platform: Callable[..., ProcessPlatform], state_dir: Path
) -> None:
    platform = make_platform()
    (state_dir / "sessions").mkdir(parents=True)
    (state_dir / "sessions" / "broken.json").write_text("{not json")
    assert await platform.list_sessions() == []
    assert await platform.status("broken") is None
    assert (await platform.stop("broken", 1)).state == "stopped"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESS_STATE_DIR", "~/somewhere")
    monkeypatch.setenv("MAX_SESSIONS", "3")
    monkeypatch.setenv("PROCESS_START_TIMEOUT", "1m")
    platform = ProcessPlatform(agent_id=AGENT)
    assert platform.state_dir == Path("~/somewhere").expanduser()
    assert platform.home_root == platform.state_dir / "homes"
    assert platform.config.max_sessions == 3
    assert platform.config.process_start_timeout == 60.0

    monkeypatch.setenv("PROCESS_START_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="PROCESS_START_TIMEOUT"):
        ProcessPlatform(agent_id=AGENT)
    with pytest.raises(ConfigError, match=r"ProcessPlatform\.Settings"):
        ProcessPlatform(Platform.Settings(), agent_id=AGENT)


def test_unsafe_names_become_digests() -> None:
    assert process_module._file_name("session-1.a") == "session-1.a"
    for unsafe in ("../etc", "a/b", ".hidden", "", "x" * 200):
        name = process_module._file_name(unsafe)
        assert name.startswith("_")
        assert "/" not in name
        assert len(name) == 41
