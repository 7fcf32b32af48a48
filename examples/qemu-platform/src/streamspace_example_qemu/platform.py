"""The ``qemu`` platform: every session is a QEMU virtual machine, seen through QEMU's own
VNC server.

This is the platform plugin to copy when you write your own. It shows the parts every
driver needs, and why each is there:

* a nested ``Settings`` class, read from the environment when the driver is built, so the
  package stands alone (the agent knows nothing of ``QEMU_*`` variables);
* a model of the template's ``platform_options``, read with :meth:`Platform.options`, so a
  misspelt option fails the start and says what the driver knows;
* a state directory: everything ``_status``, ``_stop`` and ``_vnc_endpoint`` need is on
  disk, not in this object, so a restarted agent (or an HA successor on the same host)
  adopts the VMs that are running;
* ``check()``, which fails at agent start-up, saying what to install, when QEMU is missing;
* ``capabilities``: ``adopt`` only. Hibernation would need the VM's memory saved and
  restored (QEMU can, through its QMP monitor); without the capability the base class
  refuses ``hibernate`` and ``wake`` with ``NotSupported`` and the conformance kit skips
  their tests.

The base class (:class:`streamspace_sdk.Platform`) already serialises calls per session,
skips a generation already applied, refuses older ones and adds the standard labels; the
underscore methods below only do the platform's part.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from streamspace_sdk import (
    Capacity,
    Duration,
    Platform,
    PlatformError,
    SessionNotFound,
    SessionSpec,
    SessionStatus,
    VncEndpoint,
)
from streamspace_sdk.settings import StreamSpaceSettings, driver_settings

__all__ = ["INSTALL_HINT", "QemuOptions", "QemuPlatform"]

INSTALL_HINT = "apt-get install qemu-system-x86"
"""What to install on Debian or Ubuntu."""

_VNC_HOST = "127.0.0.1"
"""Where the VMs' VNC servers listen. QEMU's VNC server here has no password, so it must
only be reachable from this host: the agent connects and relays what the control plane
has authorised."""
_VNC_BASE_PORT = 5900
"""QEMU takes a VNC *display* number; the TCP port is 5900 plus that."""
_LAUNCH_ATTEMPTS = 5
"""Launches tried when another program took the chosen port before QEMU bound it."""
_PORT_TAKEN = "Address already in use"
_KILL_WAIT_S = 5.0
"""How long a SIGKILLed VM gets to disappear before ``stop`` reports an error."""
_KVM_DEVICE = Path("/dev/kvm")
_POLL_S = 0.02
"""A daemonised QEMU is not our child, so nothing tells us it exited: we poll ``/proc``."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class QemuOptions(BaseModel):
    """The template's ``platform_options`` this platform understands; any other is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    disk: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """File name of a disk image in ``QEMU_IMAGE_DIR`` to boot. A name, not a path: template
    authors must not make the agent hand its host's files to a VM. Unset: no disk, the
    screen shows the BIOS, which is a real framebuffer and starts in milliseconds."""

    disk_format: Literal["raw", "qcow2"] = "raw"
    """Format of ``disk``. Always given to QEMU, which refuses to guess raw images."""


class _Record(BaseModel):
    """What the platform keeps of one session, in ``<state dir>/sessions/<name>/record.json``."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    generation: int
    agent_id: str
    """The agent that manages it; other agents sharing the state directory leave it alone."""
    user: str
    template: str
    labels: dict[str, str]
    """The spec's labels, standard ones included."""
    vnc_port: int
    argv: list[str]
    """The QEMU command line, for people debugging a session."""
    started_at: datetime


class QemuPlatform(Platform):
    """Runs each session as a ``qemu-system-x86_64`` VM with QEMU's VNC server on 127.0.0.1.

    A start runs QEMU with ``-daemonize``: the command returns once the VM is set up and
    its VNC server listens (so the session is ``running`` at once), or fails with QEMU's
    own message; the VM then lives on its own, outliving the agent. Software emulation
    (``-accel tcg``) by default, so no KVM is needed; ``-nodefaults`` leaves out the
    network card, whose boot ROM would spend seconds trying to boot from the network.

    The session's ``resources`` size the VM (``memory_limit_mib``, else ``QEMU_MEMORY``;
    ``cpu_limit_m`` rounded up to whole CPUs, else one). A template's ``disk`` option boots
    that image with ``snapshot=on``: the VM's writes go to a temporary overlay, so many
    sessions share one image and none changes it.

    State: ``<QEMU_STATE_DIR>/sessions/<session>/`` holds ``record.json`` (generation,
    labels, port) and ``qemu.pid`` (written by QEMU). A VM is alive while that pid runs
    and its command line names that pid file, so a reused pid is never taken for it.
    """

    name: ClassVar[str] = "qemu"
    capabilities: ClassVar[frozenset[str]] = frozenset({"adopt"})

    class Settings(StreamSpaceSettings):
        """Settings of the ``qemu`` platform; each field is the environment variable of the
        same name in upper case (``QEMU_STATE_DIR``...)."""

        qemu_binary: str = "qemu-system-x86_64"
        """The QEMU program: a name looked up on ``PATH``, or a path."""

        qemu_state_dir: Path = Path("~/.streamspace/qemu")
        """Where session records and pid files live; in the agent's home, not ``/tmp``
        (which may be cleaned), so that a restarted agent finds its VMs."""

        qemu_image_dir: Path | None = None
        """Where the disk images templates name live; unset means ``<state dir>/images``."""

        qemu_accel: Literal["tcg", "kvm"] = "tcg"
        """``tcg`` (software emulation, works anywhere) or ``kvm`` (needs ``/dev/kvm``)."""

        qemu_memory: int = Field(default=64, ge=16)
        """MiB of RAM of a VM whose template sets no memory limit. The BIOS needs little."""

        qemu_start_timeout: Annotated[Duration, Field(gt=0)] = 30.0
        """Seconds QEMU may take to set a VM up. It takes well under one on an idle host."""

        qemu_stop_timeout: Annotated[Duration, Field(ge=0)] = 5.0
        """Seconds between SIGTERM and SIGKILL at stop; QEMU exits on SIGTERM at once."""

        max_sessions: int = Field(default=4, ge=0)
        """VMs this host runs at once (``MAX_SESSIONS``, as the agent's). Low, because an
        emulated CPU costs a host CPU while the guest is busy."""

        path: str = os.defpath
        """``PATH``: where ``QEMU_BINARY`` is looked up. QEMU gets only this variable, not
        the agent's environment (which holds its token)."""

        @field_validator("qemu_state_dir", "qemu_image_dir")
        @classmethod
        def _expand(cls, value: Path | None) -> Path | None:
            return value.expanduser() if value is not None else None

    def __init__(self, settings: StreamSpaceSettings | None = None, *, agent_id: str) -> None:
        # driver_settings reads QemuPlatform.Settings from the environment when the agent
        # passes none, and names the variable when a value is bad.
        config = driver_settings(QemuPlatform.Settings, settings, "QemuPlatform")
        super().__init__(config, agent_id=agent_id)
        self.config: QemuPlatform.Settings = config
        self.state_dir: Path = config.qemu_state_dir
        self.image_dir: Path = config.qemu_image_dir or self.state_dir / "images"
        # Held from the capacity check to the end of the launch, so two concurrent starts
        # cannot both take the last place.
        self._admission = asyncio.Lock()
        self._launching: set[str] = set()

    # -- checks ------------------------------------------------------------------------------

    def instance_scope(self) -> str:
        """This host and the state directory: agents sharing both share the VMs."""
        return f"{socket.gethostname()}:{self.state_dir.resolve()}"

    async def check(self) -> None:
        """Fail, saying what to install or fix, if no VM could start.

        Raises:
            PlatformError: QEMU is missing or broken, ``/dev/kvm`` is not usable with
                ``QEMU_ACCEL=kvm``, or ``QEMU_STATE_DIR`` is not writable.
        """
        binary = self._binary()
        try:
            code, output = await self._run([binary, "-version"])
        except TimeoutError:
            raise PlatformError(f"{binary} -version did not answer") from None
        if code != 0:
            raise PlatformError(f"{binary} -version failed: {output}")
        if self.config.qemu_accel == "kvm" and not os.access(_KVM_DEVICE, os.R_OK | os.W_OK):
            raise PlatformError(
                "QEMU_ACCEL=kvm needs read and write access to /dev/kvm (add the agent's user "
                "to the kvm group), or set QEMU_ACCEL=tcg"
            )
        self._ensure_dir(self.state_dir / "sessions")
        if not os.access(self.state_dir / "sessions", os.W_OK | os.X_OK):
            raise PlatformError(f"QEMU_STATE_DIR {self.state_dir} is not writable")

    # -- what the base class calls -----------------------------------------------------------

    async def _start(self, spec: SessionSpec) -> SessionStatus:
        async with self._admission:
            previous = self._load(spec.session_id)
            if previous is not None and previous.agent_id != self.agent_id:
                raise PlatformError(
                    f"session {spec.session_id!r} belongs to agent {previous.agent_id!r}, "
                    f"which shares QEMU_STATE_DIR {self.state_dir} with this one"
                )
            if previous is not None:
                if self._vm_pid(spec.session_id) is not None:
                    # Running under an older generation: it is what was asked for.
                    record = previous.model_copy(
                        update={"generation": spec.generation, "labels": spec.labels}
                    )
                    self._save(record)
                    return self._observe(record)
                self._remove(spec.session_id)  # what is left of a VM that died
            options = self.options(spec, QemuOptions)
            disk = self._disk(options)
            active = sum(1 for s in await self._list_sessions() if s.state == "running")
            if active >= self.config.max_sessions:
                raise PlatformError(
                    f"this host runs {active} VMs, its maximum (MAX_SESSIONS); "
                    f"session {spec.session_id!r} was not started"
                )
            self._launching.add(spec.session_id)
            try:
                record = await self._launch(spec, options, disk)
            except BaseException:
                await self._kill(spec.session_id)  # a VM a timed-out launch may have left
                self._remove(spec.session_id)
                raise
            finally:
                self._launching.discard(spec.session_id)
            return self._observe(record)

    async def _stop(self, session_id: str, generation: int) -> SessionStatus:
        if self._load(session_id) is not None:
            await self._kill(session_id)
            self._remove(session_id)
        return SessionStatus(session_id=session_id, generation=generation, state="stopped")

    async def _status(self, session_id: str) -> SessionStatus | None:
        record = self._load(session_id)
        if record is None or record.agent_id != self.agent_id:
            return None
        return self._observe(record)

    async def _list_sessions(self) -> list[SessionStatus]:
        # Adoption: a new object (a restarted agent) finds the VMs from the records alone.
        folder = self.state_dir / "sessions"
        records = (self._read(path) for path in sorted(folder.glob("*/record.json")))
        return [self._observe(r) for r in records if r is not None and r.agent_id == self.agent_id]

    async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
        status = await self._status(session_id)
        if status is None or status.vnc is None:
            state = status.state if status is not None else "unknown"
            raise SessionNotFound(f"session {session_id!r} has no running VM ({state})")
        return status.vnc

    async def _capacity(self) -> Capacity:
        return Capacity(max_sessions=self.config.max_sessions)

    # -- running QEMU ------------------------------------------------------------------------

    async def _launch(self, spec: SessionSpec, options: QemuOptions, disk: Path | None) -> _Record:
        folder = self._session_dir(spec.session_id)
        self._ensure_dir(folder)
        for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
            port = _free_port()
            argv = self._argv(spec, port, disk, options.disk_format)
            record = _Record(
                session_id=spec.session_id,
                generation=spec.generation,
                agent_id=self.agent_id,
                user=spec.user,
                template=spec.template,
                labels=spec.labels,
                vnc_port=port,
                argv=argv,
                started_at=datetime.now(UTC),
            )
            # Saved before QEMU runs: an agent that dies mid-launch leaves a record, so the
            # next one finds the VM (or knows to clean up).
            self._save(record)
            error = await self._run_daemonized(argv)
            if error is None:
                return record
            if _PORT_TAKEN not in error or attempt == _LAUNCH_ATTEMPTS:
                raise PlatformError(f"QEMU could not start session {spec.session_id!r}: {error}")
        raise AssertionError("unreachable")

    async def _run_daemonized(self, argv: list[str]) -> str | None:
        """Run QEMU with ``-daemonize``; return ``None`` once the VM is up, else its error."""
        try:
            code, error = await self._run(argv)
        except TimeoutError:
            return f"QEMU did not set the VM up within {self.config.qemu_start_timeout:g}s"
        if code == 0:
            return None
        return error or f"exit status {code}"

    async def _run(self, argv: list[str]) -> tuple[int, str]:
        """Run ``argv`` to its end; return its exit status and its stderr (stripped).

        The standard library's ``subprocess`` in a thread, not an asyncio subprocess: the
        agent runs on uvloop, whose children keep a stray copy of the stderr pipe, which
        a daemonised QEMU would hold open, so reading it would never end. ``subprocess``
        closes every other descriptor in the child (``close_fds``), so QEMU inherits
        nothing of the agent's.

        Raises:
            TimeoutError: ``argv`` ran longer than ``QEMU_START_TIMEOUT``.
        """
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self._qemu_env(),
                timeout=self.config.qemu_start_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError from None
        return done.returncode, done.stderr.decode(errors="replace").strip()

    def _argv(self, spec: SessionSpec, port: int, disk: Path | None, disk_format: str) -> list[str]:
        limits = spec.resources
        memory = limits.memory_limit_mib or self.config.qemu_memory
        cpus = max(1, math.ceil((limits.cpu_limit_m or 1000) / 1000))
        argv = [
            self._binary(),
            "-name",
            f"guest={_escape('streamspace-' + spec.session_id)}",  # the VNC desktop name
            "-nodefaults",  # no NIC (its PXE ROM tries to boot for seconds), serial or CD-ROM
            "-no-user-config",  # ignore the host's QEMU configuration files
            "-accel",
            self.config.qemu_accel,
            "-m",
            str(memory),
            "-smp",
            str(cpus),
            "-vga",
            "std",
            "-vnc",
            f"{_VNC_HOST}:{port - _VNC_BASE_PORT}",
            "-daemonize",
            "-pidfile",
            str(self._pid_file(spec.session_id)),
        ]
        if disk is not None:
            # IDE: SeaBIOS boots from it on any machine type; snapshot=on: writes are thrown
            # away with the VM, so the image is shared and never changed.
            drive = f"file={_escape(str(disk))},format={disk_format},if=ide,snapshot=on"
            argv += ["-drive", drive]
        return argv

    async def _kill(self, session_id: str) -> None:
        """Stop the session's VM: SIGTERM (QEMU exits cleanly), SIGKILL after the grace.

        Raises:
            PlatformError: the VM was still there after SIGKILL.
        """
        for sig, wait_s in (
            (signal.SIGTERM, self.config.qemu_stop_timeout),
            (signal.SIGKILL, _KILL_WAIT_S),
        ):
            pid = self._vm_pid(session_id)
            if pid is None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if await self._gone(session_id, wait_s):
                return
        raise PlatformError(f"the VM of session {session_id!r} survived SIGKILL")

    async def _gone(self, session_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the session's VM to exit; return whether it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._vm_pid(session_id) is None:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)  # not our child: nothing notifies us of its exit

    def _vm_pid(self, session_id: str) -> int | None:
        """Return the pid of the session's live QEMU, or ``None`` if none runs."""
        pid_file = self._pid_file(session_id)
        try:
            pid = int(pid_file.read_text().strip())
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        state = stat[stat.rindex(")") + 2 :].split()[0]  # after "pid (comm) "
        if state in ("Z", "X") or str(pid_file).encode() not in cmdline:
            return None  # exited (a zombie nobody reaped), or the pid now names another program
        return pid

    def _observe(self, record: _Record) -> SessionStatus:
        pid = self._vm_pid(record.session_id)
        labels: dict[str, JsonValue] = dict(record.labels)
        base = SessionStatus(
            session_id=record.session_id,
            generation=record.generation,
            state="failed",
            detail="the VM exited",
            platform_metadata={"pid": pid, "vnc_port": record.vnc_port, "labels": labels},
        )
        if pid is not None:
            vnc = VncEndpoint(host=_VNC_HOST, port=record.vnc_port)
            return base.model_copy(update={"state": "running", "detail": "", "vnc": vnc})
        if record.session_id in self._launching:
            return base.model_copy(update={"state": "starting", "detail": "QEMU is starting"})
        return base

    # -- helpers -----------------------------------------------------------------------------

    def _binary(self) -> str:
        found = shutil.which(self.config.qemu_binary, path=self.config.path)
        if found is None:
            raise PlatformError(
                f"QEMU_BINARY {self.config.qemu_binary!r} is not installed (looked on PATH "
                f"{self.config.path}); install it: {INSTALL_HINT}"
            )
        return found

    def _qemu_env(self) -> dict[str, str]:
        return {"PATH": self.config.path, "LC_ALL": "C"}

    def _disk(self, options: QemuOptions) -> Path | None:
        if options.disk is None:
            return None
        disk = self.image_dir / options.disk
        if not disk.is_file():
            raise PlatformError(
                f"the template's disk {options.disk!r} is not a file in QEMU_IMAGE_DIR "
                f"{self.image_dir}"
            )
        return disk

    def _session_dir(self, session_id: str) -> Path:
        return self.state_dir / "sessions" / _file_name(session_id)

    def _pid_file(self, session_id: str) -> Path:
        return self._session_dir(session_id) / "qemu.pid"

    def _load(self, session_id: str) -> _Record | None:
        record = self._read(self._session_dir(session_id) / "record.json")
        return record if record is not None and record.session_id == session_id else None

    @staticmethod
    def _read(path: Path) -> _Record | None:
        try:
            return _Record.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return None  # gone, half-removed, or not ours: nothing to manage

    def _save(self, record: _Record) -> None:
        # Written to a temporary file and renamed, so a reader never sees half a record.
        path = self._session_dir(record.session_id) / "record.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.model_dump_json(indent=2))
        tmp.replace(path)

    def _remove(self, session_id: str) -> None:
        shutil.rmtree(self._session_dir(session_id), ignore_errors=True)

    @staticmethod
    def _ensure_dir(path: Path) -> None:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PlatformError(f"cannot create {path}: {exc}") from exc


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (QEMU may still lose it to a race,
    which ``_launch`` detects from QEMU's message and retries)."""
    with socket.socket() as probe:
        probe.bind((_VNC_HOST, 0))  # ephemeral ports are all above 5900
        return int(probe.getsockname()[1])


def _escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def _file_name(session_id: str) -> str:
    """Return ``session_id`` if it is a safe directory name, else a stable digest of it."""
    if _SAFE_NAME.fullmatch(session_id):
        return session_id
    return "_" + hashlib.sha256(session_id.encode()).hexdigest()[:32]
