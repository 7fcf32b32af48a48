"""The ``process`` platform: each session is a process group on the agent's own host.

By default a session is TigerVNC's ``Xvnc`` with an X client (``xterm``) on its display; a
template's ``command`` replaces that. What runs is recorded under a state directory, so a
restarted agent finds and adopts the sessions that are still alive. Linux only (it reads
``/proc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, ClassVar, Literal, NamedTuple

from pydantic import Field, JsonValue, ValidationError, field_validator

from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import PlatformError, SessionNotFound
from streamspace_sdk.platform import (
    Capacity,
    Platform,
    SessionSpec,
    SessionStatus,
    VncEndpoint,
)
from streamspace_sdk.settings import Duration, StreamSpaceSettings, driver_settings

__all__ = ["INSTALL_HINT", "PLACEHOLDERS", "SESSION_ID_VARIABLE", "ProcessPlatform"]

log = logging.getLogger(__name__)

PLACEHOLDERS: tuple[str, ...] = ("{display}", "{vnc_port}", "{home}", "{session_id}", "{user}")
"""What ``ProcessPlatform`` replaces in each argument of a spec's ``command``."""

_VNC_HOST = "127.0.0.1"
"""Where session VNC servers listen: loopback, so only this host reaches them."""

INSTALL_HINT = "apt-get install tigervnc-standalone-server xterm"
"""What to install on Debian or Ubuntu for the default command."""

SESSION_ID_VARIABLE = "STREAMSPACE_SESSION_ID"
"""Set in every session process; marks the processes of a session once its leader is gone."""

_SUPERVISOR = Path(__file__).with_name("_supervisor.py")
_FIRST_DISPLAY = 20
"""Lowest X display handed out; :0 to :19 are left to desktops, vncserver and Xvfb."""
_LAST_DISPLAY = 4000
_LAUNCH_ATTEMPTS = 5
"""Starts tried when the display or port was taken between choosing and binding it."""
_COLLISION = re.compile(
    r"Server is already active for display|server already running|Address already in use"
)
"""What Xvnc (or another X server) says when the display or port was taken."""
_RFB_BANNER = re.compile(rb"RFB \d{3}\.\d{3}\n")
_POLL_S = 0.02
"""Polling interval for things nothing can notify us of: a port opening, a process exiting
when it is not our child."""
_KILL_WAIT_S = 5.0
"""How long SIGKILLed processes get to disappear before ``stop`` reports an error."""
_DYING_WAIT_S = 1.0
"""How long to let processes killed from outside finish exiting before clearing their files."""
_TAIL_BYTES = 4096
_TAIL_LINES = 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


class _Program(WireModel):
    """One program of a session, as the supervisor runs it."""

    argv: list[str]
    """Absolute path of the program, then its arguments (placeholders filled in)."""
    displayfd: bool = False
    """An X server: the next program starts once it reports its display ready."""


class _Record(WireModel):
    """What the platform knows of one session; one JSON file per session."""

    session_id: str
    """The session's id."""
    generation: int
    """Generation of the last command applied."""
    agent_id: str
    """Agent that manages it; other agents sharing the state directory ignore it."""
    state: Literal["starting", "running", "hibernated"]
    """What was last done to it; whether its processes still live is observed."""
    user: str
    """Owner."""
    template: str
    """Template it was made from."""
    labels: dict[str, str]
    """The spec's labels, standard ones included."""
    command: list[str]
    """The spec's command (empty: the default Xvnc and X client)."""
    programs: list[_Program]
    """What was actually run, placeholders filled in."""
    persistent_home: bool
    """The home belongs to the user and outlives the session."""
    home: str
    """The session's ``HOME``."""
    log: str
    """The session's log file (stdout and stderr of its processes)."""
    pid: int | None = None
    """The supervisor, leader of the session's process group; ``None`` when none runs."""
    pgid: int | None = None
    """The session's process group (equal to ``pid``)."""
    start_ticks: int | None = None
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), so a
    reused pid is never mistaken for the session."""
    display: int | None = None
    """X display number while running."""
    vnc_port: int | None = None
    """TCP port of the VNC server on 127.0.0.1 while running."""
    started_at: datetime | None = None
    """When the processes were last started (UTC)."""
    updated_at: datetime
    """When this record was last written (UTC)."""


class _Stat(NamedTuple):
    state: str
    pgrp: int
    start_ticks: int


class _StartFailed(Exception):
    """A launch attempt failed; ``collision`` when another server took the display or port."""

    def __init__(self, reason: str, *, collision: bool = False) -> None:
        super().__init__(reason)
        self.collision = collision


class ProcessPlatform(Platform):
    """Runs each session as a local process group; the built-in ``process`` platform.

    A session runs under a small supervisor (``_supervisor.py``, started with ``setsid``) that
    leads its own session and process group and reaps every process in it. Its programs are
    the spec's ``command``, where each argument may use the placeholders ``{display}``,
    ``{vnc_port}``, ``{home}``, ``{session_id}`` and ``{user}``; the program is looked up on
    ``PATH`` (the spec's ``env`` may set its own). An empty command runs the default::

        Xvnc :{display} -rfbport {vnc_port} -interface 127.0.0.1 -SecurityTypes None
             -geometry 1280x800 -depth 24 -nolisten tcp -desktop streamspace-{session_id}
        xterm                     # started once Xvnc reports its display ready

    The VNC server accepts clients without a password (``-SecurityTypes None``). That is
    acceptable because it listens on 127.0.0.1 only, where the agent is the one meant to
    connect and relays the stream to viewers the control plane has authorised. Local users
    of the same host can reach loopback too, so run this platform on hosts you do not share.
    (``-interface 127.0.0.1`` rather than ``-localhost``, which also binds ``::1``.)

    Every session gets a free X display from :20 up, taken by creating ``/tmp/.X{n}-lock``
    atomically as X servers do (stale locks and sockets of dead servers are cleared), and a
    free TCP port on 127.0.0.1 (bound to test it). The default Xvnc runs with ``-displayfd``,
    which writes no lock, so the lock names the session's supervisor while it runs; for a
    custom command the lock is removed just before it starts, for its own X server to take.
    If another server takes the display or port before the session binds it, the start is
    tried again with new ones. ``start`` returns ``running`` once
    the port answers with an RFB banner; if the processes exit first, or
    ``PROCESS_START_TIMEOUT`` passes, it kills the group, removes what it created and raises
    :class:`PlatformError` with the tail of the session's output.

    Session processes get ``HOME``, ``USER``, ``LOGNAME``, ``DISPLAY``, ``PATH``, ``LANG``
    and the spec's ``env``, not the agent's environment (which holds its token). Their
    output goes to ``<state dir>/logs/<session>.log``. The spec's ``vnc_port`` is ignored:
    sessions share the host's network, so the platform picks the port.

    Homes: a ``persistent_home`` session uses ``PROCESS_HOME_ROOT/<user>``, which outlives
    it; any other session gets a home of its own under ``<state dir>/scratch``, removed at
    stop. Both survive hibernate.

    State: ``<state dir>/sessions/<session>.json`` records each session (generation, state,
    pid and start time, display, port, home, labels, what runs), written atomically. A new
    object (a restarted agent) reads them: live sessions are adopted; those whose processes
    died report ``failed`` with detail ``process exited`` until stopped. Sessions outlive the
    agent: its processes are not the agent's to keep (they run in their own sessions), so an
    agent killed with SIGKILL leaves them running.

    Capabilities: ``hibernate`` (stop the processes, keep the record and the home; wake
    starts them again with the same home, on a new display and port), ``persistent_home``
    and ``adopt``.
    """

    name: ClassVar[str] = "process"
    capabilities: ClassVar[frozenset[str]] = frozenset({"hibernate", "persistent_home", "adopt"})

    class Settings(StreamSpaceSettings):
        """Settings of the ``process`` platform, read from the environment."""

        process_state_dir: Path = Path("~/.streamspace/process")
        """Where session records, logs and scratch homes live. In the agent's home so that a
        restarted agent finds its sessions; not ``/tmp``, which may be cleaned."""

        process_home_root: Path | None = None
        """Parent of the users' persistent homes; unset means ``<state dir>/homes``."""

        max_sessions: int = Field(default=10, ge=0)
        """Sessions this host runs at once (``MAX_SESSIONS``, as the agent's)."""

        process_start_timeout: Annotated[Duration, Field(gt=0)] = 20.0
        """Seconds a session may take to answer on its VNC port. Xvnc needs well under a
        second; 20 s leaves room for a slow X client or a loaded host."""

        process_stop_timeout: Annotated[Duration, Field(ge=0)] = 5.0
        """Seconds between SIGTERM and SIGKILL at stop; X programs exit in milliseconds."""

        process_xvnc: str = "Xvnc"
        """The X VNC server of the default command: a name looked up on ``PATH``, or a path."""

        process_x_client: str = "xterm"
        """The X client of the default command: a name looked up on ``PATH``, or a path."""

        process_geometry: str = Field(default="1280x800", pattern=r"^[1-9]\d{1,4}x[1-9]\d{1,4}$")
        """Screen size of the default command, ``WIDTHxHEIGHT``."""

        path: str = os.defpath
        """``PATH``: where programs are looked up, and the sessions' ``PATH`` unless the spec's
        env sets one. The agent's own ``PATH``."""

        @field_validator("process_state_dir", "process_home_root")
        @classmethod
        def _expand(cls, value: Path | None) -> Path | None:
            return value.expanduser() if value is not None else None

    def __init__(self, settings: StreamSpaceSettings | None = None, *, agent_id: str) -> None:
        settings = driver_settings(ProcessPlatform.Settings, settings, "ProcessPlatform")
        super().__init__(settings, agent_id=agent_id)
        self.config: ProcessPlatform.Settings = settings
        self.state_dir: Path = settings.process_state_dir
        """Root of the records, logs and scratch homes."""
        self.home_root: Path = settings.process_home_root or self.state_dir / "homes"
        """Parent of the users' persistent homes."""
        self._admission = asyncio.Lock()
        self._starting: set[str] = set()
        self._exit_status: dict[tuple[int, int], int] = {}

    # -- checks ------------------------------------------------------------------------------

    def instance_scope(self) -> str:
        """This host and the state directory: processes sharing both share sessions."""
        return f"{socket.gethostname()}:{self.state_dir.resolve()}"

    async def check(self) -> None:
        """Fail now, saying what to install or fix, if sessions with the default command
        could not start: ``Xvnc`` or ``xterm`` missing, or the state directory not writable.

        The agent calls it at start-up and exits if it fails.

        Raises:
            PlatformError: naming the missing program and the Debian package to install.
        """
        self._default_programs(display=_FIRST_DISPLAY, port=5900, session_id="check")
        self._ensure_dir(self.state_dir)
        if not os.access(self.state_dir, os.W_OK | os.X_OK):
            raise PlatformError(f"PROCESS_STATE_DIR {self.state_dir} is not writable")

    # -- driver methods --------------------------------------------------------------------

    async def _start(self, spec: SessionSpec) -> SessionStatus:
        previous = self._load(spec.session_id)
        if previous is not None and previous.agent_id != self.agent_id:
            raise PlatformError(
                f"session {spec.session_id!r} belongs to agent {previous.agent_id!r}, "
                f"which shares PROCESS_STATE_DIR {self.state_dir} with this one"
            )
        if previous is not None:
            if previous.state == "running" and self._leader_alive(previous):
                # Already running, under an older generation: it is what was asked for.
                current = self._save(
                    previous.model_copy(
                        update={"generation": spec.generation, "labels": spec.labels}
                    )
                )
                return self._observe(current)
            await self._kill(previous)  # leftovers of a dead, interrupted or hibernated run
        return await self._launch(spec, previous)

    async def _wake(self, spec: SessionSpec) -> SessionStatus:
        return await self._start(spec)  # _start resumes a hibernated record with its home

    async def _stop(self, session_id: str, generation: int) -> SessionStatus:
        record = self._load(session_id)
        if record is not None:
            await self._kill(record)
            await self._discard(record, keep_home=record.persistent_home)
        return SessionStatus(session_id=session_id, generation=generation, state="stopped")

    async def _hibernate(self, session_id: str, generation: int) -> SessionStatus:
        record = self._load(session_id)
        if record is None:
            raise SessionNotFound(f"no session {session_id!r} to hibernate")
        await self._kill(record)
        hibernated = self._save(_hibernated(record, generation))
        return self._observe(hibernated)

    async def _status(self, session_id: str) -> SessionStatus | None:
        record = self._load(session_id)
        if record is None or record.agent_id != self.agent_id:
            return None
        return await self._status_of(record)

    async def _list_sessions(self) -> list[SessionStatus]:
        found = []
        for record in self._records():
            if record.agent_id == self.agent_id:
                found.append(await self._status_of(record))
        return found

    async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
        status = await self._status(session_id)
        if status is None or status.state != "running" or status.vnc is None:
            state = status.state if status is not None else "unknown"
            raise SessionNotFound(f"session {session_id!r} is not running ({state})")
        return status.vnc

    async def _capacity(self) -> Capacity:
        return Capacity(max_sessions=self.config.max_sessions)

    # -- starting ----------------------------------------------------------------------------

    async def _launch(self, spec: SessionSpec, previous: _Record | None) -> SessionStatus:
        """Start the session's processes and wait for its VNC port; undo everything on error."""
        sid = spec.session_id
        home, persistent = self._home(spec, previous)
        record: _Record | None = None
        collided: set[int] = set()
        try:
            for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
                async with self._admission:  # capacity and display/port choice, one at a time
                    self._check_capacity(sid)
                    port = self._free_port()
                    display = self._reserve_display(avoid=collided)
                    try:
                        programs = self._programs(spec, display, port, home)
                        self._ensure_dir(home)
                        record = self._save(
                            _Record(
                                session_id=sid,
                                generation=spec.generation,
                                agent_id=self.agent_id,
                                state="starting",
                                user=spec.user,
                                template=spec.template,
                                labels=spec.labels,
                                command=spec.command,
                                programs=programs,
                                persistent_home=persistent,
                                home=str(home),
                                log=str(self._log_path(sid)),
                                display=display,
                                vnc_port=port,
                                started_at=datetime.now(UTC),
                                updated_at=datetime.now(UTC),
                            )
                        )
                    except BaseException:
                        _clear_stale_x_files(display, ours=True)
                        raise
                    self._starting.add(sid)
                offset = self._log_header(record, attempt)
                if not record.programs[0].displayfd:
                    _remove_x_lock(display)  # the command's own X server will lock the display
                record = self._save(self._spawn(record, self._environment(spec, record)))
                if record.programs[0].displayfd and record.pid is not None:
                    _hand_over_x_lock(display, record.pid)  # Xvnc -displayfd writes no lock
                try:
                    await self._await_vnc(record, offset)
                    break
                except _StartFailed as failed:
                    await self._kill(record)
                    if not failed.collision or attempt == _LAUNCH_ATTEMPTS:
                        tail = self._log_tail(Path(record.log), offset)
                        raise PlatformError(
                            f"session {sid!r} did not start: {failed}; its output ends:\n{tail}"
                        ) from None
                    collided.add(display)
                    log.info("session %s: display or port taken, retrying (%s)", sid, failed)
        except BaseException:
            self._starting.discard(sid)
            if record is not None:
                with contextlib.suppress(PlatformError):
                    await self._kill(record)
            await self._undo(sid, previous, home, keep_home=persistent)
            raise
        self._starting.discard(sid)
        assert record is not None
        return self._observe(self._save(record.model_copy(update={"state": "running"})))

    async def _undo(
        self, session_id: str, previous: _Record | None, home: Path, *, keep_home: bool
    ) -> None:
        """Leave things as they were before a failed start: a hibernated session stays
        hibernated with its home; anything else is removed, apart from a persistent home."""
        if previous is not None and previous.state == "hibernated":
            self._save(previous)
            return
        self._forget(session_id)
        if not keep_home:
            await asyncio.to_thread(shutil.rmtree, home, ignore_errors=True)

    def _check_capacity(self, session_id: str) -> None:
        limit = self.config.max_sessions
        active = sum(
            1
            for record in self._records()
            if record.agent_id == self.agent_id
            and record.session_id != session_id
            and record.state != "hibernated"
            and (record.session_id in self._starting or self._leader_alive(record))
        )
        if active >= limit:
            raise PlatformError(f"capacity full: {active} of {limit} sessions (MAX_SESSIONS)")

    def _reserve_display(self, avoid: set[int]) -> int:
        """Take a free X display by creating its lock file, atomically, as X servers do.

        The lock holds the agent's pid until the session's supervisor replaces it, so other
        agents and X servers on this host leave the display alone.
        """
        recorded = {r.display for r in self._records() if r.display is not None}
        for display in range(_FIRST_DISPLAY, _LAST_DISPLAY):
            if display in avoid or display in recorded:
                continue
            _clear_stale_x_files(display)
            if not _x_socket_in_use(display) and _write_x_lock(display, os.getpid(), new=True):
                return display
        raise PlatformError(f"no free X display between :{_FIRST_DISPLAY} and :{_LAST_DISPLAY}")

    def _free_port(self) -> int:
        ports = {r.vnc_port for r in self._records() if r.vnc_port is not None}
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((_VNC_HOST, 0))  # the kernel hands out a port nobody has bound
                port = int(probe.getsockname()[1])
            if port not in ports:
                return port
        raise PlatformError("no free TCP port on 127.0.0.1")

    def _programs(self, spec: SessionSpec, display: int, port: int, home: Path) -> list[_Program]:
        if not spec.command:
            return self._default_programs(display=display, port=port, session_id=spec.session_id)
        filled = (str(display), str(port), str(home), spec.session_id, spec.user)
        values = dict(zip(PLACEHOLDERS, filled, strict=True))
        argv = [_fill(arg, values) for arg in spec.command]
        path = spec.env.get("PATH", self.config.path)
        found = shutil.which(argv[0], path=path)
        if found is None:
            raise PlatformError(f"command not found: {argv[0]!r} (PATH={path})")
        return [_Program(argv=[found, *argv[1:]])]

    def _default_programs(self, *, display: int, port: int, session_id: str) -> list[_Program]:
        xvnc = self._which(self.config.process_xvnc, "tigervnc-standalone-server", "PROCESS_XVNC")
        client = self._which(self.config.process_x_client, "xterm", "PROCESS_X_CLIENT")
        server = [
            xvnc,
            f":{display}",
            "-rfbport",
            str(port),
            "-interface",
            _VNC_HOST,
            "-SecurityTypes",
            "None",
            "-geometry",
            self.config.process_geometry,
            "-depth",
            "24",
            "-nolisten",
            "tcp",
            "-desktop",
            f"streamspace-{session_id}",
        ]
        return [_Program(argv=server, displayfd=True), _Program(argv=[client])]

    def _which(self, program: str, package: str, variable: str) -> str:
        found = shutil.which(program, path=self.config.path)
        if found is None:
            raise PlatformError(
                f"{Path(program).name} not found: install Debian's {package} ({INSTALL_HINT}), "
                f"or set {variable} to its path (searched PATH={self.config.path})"
            )
        return found

    def _environment(self, spec: SessionSpec, record: _Record) -> dict[str, str]:
        return {
            "PATH": self.config.path,
            "LANG": "C.UTF-8",
            "SHELL": "/bin/sh",
            **spec.env,
            "HOME": record.home,
            "USER": spec.user,
            "LOGNAME": spec.user,
            "DISPLAY": f":{record.display}",
            SESSION_ID_VARIABLE: spec.session_id,
        }

    def _spawn(self, record: _Record, env: dict[str, str]) -> _Record:
        """Start the supervisor in a new session and process group; return the record with
        its pid and start time.

        ``posix_spawn`` rather than an asyncio subprocess: the session must outlive this
        object and the agent, so no transport may own it. It returns once the supervisor
        has been executed, as asyncio's own spawn does.
        """
        config = {
            "programs": [p.model_dump() for p in record.programs],
            "cwd": record.home,
            "grace_s": self.config.process_stop_timeout,
            "ready_timeout_s": self.config.process_start_timeout,
        }
        argv = [sys.executable, "-I", "-S", str(_SUPERVISOR), json.dumps(config)]
        log_flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            pid = os.posix_spawn(
                sys.executable,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, record.log, log_flags, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsid=True,
                setsigmask=(),
                setsigdef=_CATCHABLE_SIGNALS,
            )
        except OSError as exc:
            raise PlatformError(f"cannot start the session supervisor: {exc}") from exc
        stat = _proc_stat(pid)
        ticks = stat.start_ticks if stat is not None else 0
        return record.model_copy(
            update={"pid": pid, "pgid": pid, "start_ticks": ticks, "updated_at": datetime.now(UTC)}
        )

    async def _await_vnc(self, record: _Record, log_offset: int) -> None:
        """Return once the VNC port answers with an RFB banner; raise ``_StartFailed`` if the
        processes exit first or the start timeout passes."""
        assert record.vnc_port is not None
        timeout = self.config.process_start_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self._leader_alive(record):
                output = self._log_tail(Path(record.log), log_offset)
                raise _StartFailed(
                    f"{self._exit_reason(record)} before its VNC port answered",
                    collision=bool(_COLLISION.search(output)),
                )
            remaining = deadline - loop.time()
            if await _rfb_answers(record.vnc_port, min(max(remaining, 0.05), 1.0)):
                return
            if loop.time() >= deadline:
                raise _StartFailed(
                    f"VNC port {_VNC_HOST}:{record.vnc_port} did not answer with an RFB banner "
                    f"within {timeout:g}s (PROCESS_START_TIMEOUT)"
                )
            await asyncio.sleep(_POLL_S)  # nothing tells us when a port starts listening

    # -- observing ---------------------------------------------------------------------------

    async def _status_of(self, record: _Record) -> SessionStatus:
        if record.state == "starting" and record.session_id not in self._starting:
            # Being started by another agent process, or by one that is gone: finish or
            # give up on it.
            if (
                record.vnc_port is not None
                and self._leader_alive(record)
                and await _rfb_answers(record.vnc_port, 1.0)
            ):
                record = self._save(record.model_copy(update={"state": "running"}))
            elif _age_s(record) > self.config.process_start_timeout + 1.0:
                return self._observe(record, failed="start did not finish")
            elif record.pid is None:
                return self._observe(record, failed=None, starting=True)
        return self._observe(record)

    def _observe(
        self, record: _Record, *, failed: str | None = None, starting: bool = False
    ) -> SessionStatus:
        meta: dict[str, JsonValue] = {
            "pid": record.pid,
            "pgid": record.pgid,
            "display": record.display,
            "vnc_port": record.vnc_port,
            "home": record.home,
            "persistent_home": record.persistent_home,
            "user": record.user,
            "log": record.log,
        }
        base = {
            "session_id": record.session_id,
            "generation": record.generation,
            "platform_metadata": meta,
        }
        if record.state == "hibernated":
            return SessionStatus.model_validate({**base, "state": "hibernated"})
        if failed is None and not starting and not self._leader_alive(record):
            meta["exit"] = self._exit_reason(record)
            failed = "process exited"
        if failed is not None:
            return SessionStatus.model_validate({**base, "state": "failed", "detail": failed})
        if starting or record.state == "starting":
            return SessionStatus.model_validate({**base, "state": "starting"})
        assert record.vnc_port is not None
        vnc = VncEndpoint(host=_VNC_HOST, port=record.vnc_port)
        return SessionStatus.model_validate({**base, "state": "running", "vnc": vnc})

    def _leader_alive(self, record: _Record) -> bool:
        """Tell whether the session's supervisor still runs (reaping it if it just exited)."""
        if record.pid is None or record.start_ticks is None:
            return False
        stat = _proc_stat(record.pid)
        if stat is None or stat.start_ticks != record.start_ticks:
            return False  # gone, or the pid now belongs to another process
        if stat.state in ("Z", "X"):
            self._reap(record)
            return False
        return True

    def _reap(self, record: _Record) -> None:
        """Collect the exit status of the supervisor if it is our exited child."""
        if record.pid is None or record.start_ticks is None:
            return
        try:
            pid, status = os.waitpid(record.pid, os.WNOHANG)
        except ChildProcessError:
            return  # started by an earlier agent process: init reaps it
        if pid:
            self._exit_status[(pid, record.start_ticks)] = status

    def _exit_reason(self, record: _Record) -> str:
        status = self._exit_status.get((record.pid or 0, record.start_ticks or 0))
        if status is None:
            return "the session's processes exited"
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            return f"the session was killed by {signal.Signals(-code).name}"
        return f"the session exited with status {code}"

    # -- stopping ----------------------------------------------------------------------------

    async def _kill(self, record: _Record) -> None:
        """Stop every process of the session's group: SIGTERM, SIGKILL after the grace period.

        Also removes the X socket (and lock file) its X server left if it died without
        cleaning up (killed with SIGKILL), so the display is free again.

        Raises:
            PlatformError: processes were still there after SIGKILL.
        """
        if record.pgid is not None and self._owns_group(record):
            grace = self.config.process_stop_timeout + 1.0  # the supervisor's grace, then ours
            for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_WAIT_S)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record.pgid, sig)
                if await self._wait_gone(record, wait_s):
                    break
            else:
                raise PlatformError(
                    f"session {record.session_id!r}: process group {record.pgid} survived SIGKILL"
                )
        elif record.pgid is not None:
            # Killed from outside: members may still be exiting (their environment, which
            # marks them, is already gone while their sockets are not). Let them finish.
            await self._wait_gone(record, _DYING_WAIT_S)
        self._leader_alive(record)  # reaps the supervisor if it is our zombie
        if record.display is not None:
            _clear_stale_x_files(record.display, ours=True)

    async def _wait_gone(self, record: _Record, timeout_s: float) -> bool:
        assert record.pgid is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self._leader_alive(record)  # reaps the supervisor once it exits
            if not _group_alive(record.pgid):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)  # the group need not be our children: poll /proc

    def _owns_group(self, record: _Record) -> bool:
        """Tell whether the group ``record.pgid`` is still this session's (not a reused id)."""
        if self._leader_alive(record):
            return True
        assert record.pgid is not None
        marker = f"{SESSION_ID_VARIABLE}={record.session_id}".encode()
        return any(marker in _environ(pid) for pid in _group_members(record.pgid))

    async def _discard(self, record: _Record, *, keep_home: bool) -> None:
        self._forget(record.session_id)
        if not keep_home:
            await asyncio.to_thread(shutil.rmtree, record.home, ignore_errors=True)

    # -- files -------------------------------------------------------------------------------
    # Records and /proc entries are a few hundred bytes on local disk or in memory; reading
    # them inline costs microseconds, less than a hop to a thread. Homes may be large, so
    # they are removed in a thread.

    def _home(self, spec: SessionSpec, previous: _Record | None) -> tuple[Path, bool]:
        if previous is not None:
            return Path(previous.home), previous.persistent_home
        if spec.persistent_home:
            return self.home_root / _file_name(spec.user), True
        return self.state_dir / "scratch" / _file_name(spec.session_id), False

    def _record_path(self, session_id: str) -> Path:
        return self.state_dir / "sessions" / f"{_file_name(session_id)}.json"

    def _log_path(self, session_id: str) -> Path:
        return self.state_dir / "logs" / f"{_file_name(session_id)}.log"

    def _records(self) -> list[_Record]:
        folder = self.state_dir / "sessions"
        if not folder.is_dir():
            return []
        records = (self._read(path) for path in sorted(folder.glob("*.json")))
        return [record for record in records if record is not None]

    def _load(self, session_id: str) -> _Record | None:
        record = self._read(self._record_path(session_id))
        return record if record is not None and record.session_id == session_id else None

    def _read(self, path: Path) -> _Record | None:
        try:
            return _Record.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable session record %s: %s", path, exc)
            return None

    def _save(self, record: _Record) -> _Record:
        """Write ``record`` atomically (a temporary file renamed over the old one)."""
        record = record.model_copy(update={"updated_at": datetime.now(UTC)})
        path = self._record_path(record.session_id)
        self._ensure_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(record.model_dump_json(indent=2).encode())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return record

    def _forget(self, session_id: str) -> None:
        """Remove the session's record and log."""
        self._record_path(session_id).unlink(missing_ok=True)
        self._log_path(session_id).unlink(missing_ok=True)

    def _log_header(self, record: _Record, attempt: int) -> int:
        """Append a line saying what starts to the session's log; return where output begins."""
        path = Path(record.log)
        self._ensure_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        offset = os.fstat(fd).st_size
        header = (
            f"--- {datetime.now(UTC).isoformat()} generation {record.generation} "
            f"attempt {attempt}: display :{record.display}, VNC port {record.vnc_port}\n"
        )
        with os.fdopen(fd, "ab") as out:
            out.write(header.encode())
        return offset

    @staticmethod
    def _log_tail(path: Path, offset: int) -> str:
        try:
            with path.open("rb") as log_file:
                size = log_file.seek(0, os.SEEK_END)
                log_file.seek(max(offset, size - _TAIL_BYTES))
                data = log_file.read()
        except OSError as exc:
            return f"(log unreadable: {exc})"
        lines = data.decode(errors="replace").splitlines()[-_TAIL_LINES:]
        return "\n".join(lines) or "(no output)"

    @staticmethod
    def _ensure_dir(path: Path) -> None:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PlatformError(f"cannot create {path}: {exc}") from exc


_CATCHABLE_SIGNALS = tuple(
    sig for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)
)
"""Reset to their default action in the supervisor, whatever the agent ignores."""


def _hibernated(record: _Record, generation: int) -> _Record:
    return record.model_copy(
        update={
            "state": "hibernated",
            "generation": generation,
            "pid": None,
            "pgid": None,
            "start_ticks": None,
            "display": None,
            "vnc_port": None,
        }
    )


def _fill(arg: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        arg = arg.replace(placeholder, value)
    return arg


def _file_name(text: str) -> str:
    """Return ``text`` if it is a safe file name, else a stable digest of it."""
    if _SAFE_NAME.fullmatch(text):
        return text
    return "_" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _age_s(record: _Record) -> float:
    started = record.started_at or record.updated_at
    return (datetime.now(UTC) - started).total_seconds()


def _proc_stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ", comm may hold spaces
    return _Stat(state=fields[0], pgrp=int(fields[2]), start_ticks=int(fields[19]))


def _x_lock(display: int) -> Path:
    return Path(f"/tmp/.X{display}-lock")


def _write_x_lock(display: int, pid: int, *, new: bool = False) -> bool:
    """Write the X lock file of ``display`` naming ``pid`` (in the X servers' format).

    With ``new``, only if there is none: the file is linked into place, which fails if it
    exists, so two agents never both take a display. Returns whether it was written.
    """
    lock = _x_lock(display)
    tmp = lock.with_name(f".tX{display}-lock.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(f"{pid:>10}\n")
        if not new:
            os.replace(tmp, lock)
            return True
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _x_lock_pid(display: int) -> int | None:
    try:
        return int(_x_lock(display).read_text().strip())
    except (OSError, ValueError):
        return None


def _hand_over_x_lock(display: int, pid: int) -> None:
    """Make this agent's lock on ``display`` name ``pid`` instead (the session's leader)."""
    if _x_lock_pid(display) == os.getpid():
        _write_x_lock(display, pid)


def _remove_x_lock(display: int) -> None:
    """Remove this agent's lock on ``display``, so a command's own X server can take it."""
    if _x_lock_pid(display) == os.getpid():
        _x_lock(display).unlink(missing_ok=True)


def _x_socket_in_use(display: int) -> bool:
    """Tell whether an X server listens on ``/tmp/.X11-unix/X{display}``."""
    path = Path(f"/tmp/.X11-unix/X{display}")
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # busy (backlog full) or not ours to probe: leave it alone
    return True


def _clear_stale_x_files(display: int, *, ours: bool = False) -> None:
    """Remove the lock file and socket of ``display`` if no live server holds them.

    An X server killed with SIGKILL leaves them behind, and the display stays taken. With
    ``ours``, a lock naming this agent process (a reservation not handed on) goes too.
    """
    lock = _x_lock(display)
    try:
        pid = int(lock.read_text().strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return
    else:
        stat = _proc_stat(pid)
        alive = stat is not None and stat.state not in ("Z", "X")
        if alive and not (ours and pid == os.getpid()):
            return  # a live server (or another agent's reservation) holds the display
        lock.unlink(missing_ok=True)
    if not _x_socket_in_use(display):
        Path(f"/tmp/.X11-unix/X{display}").unlink(missing_ok=True)


def _group_members(pgid: int) -> list[int]:
    """Return the live (not zombie) processes of group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat.pgrp == pgid and stat.state not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # the id now belongs to another user's group
    return bool(_group_members(pgid))  # zombies left to a non-reaping init do not count


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


async def _rfb_answers(port: int, timeout_s: float) -> bool:
    """Tell whether ``127.0.0.1:port`` greets with an RFB protocol banner."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(_VNC_HOST, port)
            try:
                banner = await reader.readexactly(12)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    return _RFB_BANNER.fullmatch(banner) is not None
