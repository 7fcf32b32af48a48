"""The session supervisor of the ``process`` platform: a script, never imported by the agent.

The agent runs it as ``python -I -S _supervisor.py CONFIG`` at the head of a new session and
process group (``setsid``), so it uses the standard library only and starts in milliseconds.
``CONFIG`` is the JSON form of a dict like::

    {
        "programs": [
            {"argv": ["/usr/bin/Xvnc", ":20", ...], "displayfd": true},
            {"argv": ["/usr/bin/xterm"]},
        ],
        "cwd": "/home/dir",
        "grace_s": 5.0,
        "ready_timeout_s": 20.0,
    }

It starts the programs in order. A program marked ``displayfd`` is an X server: it gets
``-displayfd FD`` and the next program starts only once the server has written its display
number there (it is ready for clients). The session lives while every program runs; when
one exits, or the supervisor gets SIGTERM, SIGINT or SIGHUP, it terminates the rest of the
group, waits for them, and exits.

Why a supervisor and not the programs themselves: it is a child subreaper, so every process
of the session (orphans included) is reaped here and none is left a zombie on hosts whose
init does not reap (minimal containers); and it holds the X client back until the X server
accepts connections, without a polling loop in the shell.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

_PR_SET_CHILD_SUBREAPER = 36
_KILL_WAIT_S = 5.0
"""How long to wait for SIGKILLed processes to be reaped before giving up."""


class _Stop(Exception):
    """Raised from the signal handler to leave whatever the supervisor is waiting on."""


class _Failed(Exception):
    """The session cannot go on; the message is written to the log."""


def _log(message: str) -> None:
    print(f"streamspace-supervisor[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the first signal wins; the rest are ignored
    raise _Stop(signal.Signals(signum).name)


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own libc
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            _log(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
    except (OSError, AttributeError) as exc:  # not Linux, or no libc: orphans go to init
        _log(f"cannot become a subreaper: {exc}")


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _await_display(read_fd: int, name: str, timeout_s: float) -> None:
    """Block until the X server writes its display number, or fail."""
    deadline = time.monotonic() + timeout_s
    received = b""
    while not received.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failed(f"{name} did not report its display within {timeout_s:g}s")
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            chunk = os.read(read_fd, 64)
            if not chunk:
                raise _Failed(f"{name} exited before its display was ready")
            received += chunk
    _log(f"{name} is ready on display :{received.decode().strip()}")


def _spawn(argv: list[str], keep_fd: int | None = None) -> int:
    """Fork and exec ``argv`` (an absolute path first) with our environment; return its pid.

    Not ``subprocess.Popen``: a Popen object reaps its child when it is collected, which
    would hide that child's exit from ``_wait_first``.
    """
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: default signal actions, then exec
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if keep_fd is not None:
            os.set_inheritable(keep_fd, True)
        os.execv(argv[0], argv)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"streamspace-supervisor: cannot run {argv[0]}: {exc}\n".encode())
    finally:
        os._exit(127)


def _start(programs: list[dict[str, Any]], ready_timeout_s: float) -> dict[int, str]:
    mains: dict[int, str] = {}
    for program in programs:
        argv = [str(arg) for arg in program["argv"]]
        name = Path(argv[0]).name
        if not program.get("displayfd"):
            mains[_spawn(argv)] = name
            continue
        read_fd, write_fd = os.pipe()
        try:
            mains[_spawn([*argv, "-displayfd", str(write_fd)], keep_fd=write_fd)] = name
        finally:
            os.close(write_fd)
        try:
            _await_display(read_fd, name, ready_timeout_s)
        finally:
            os.close(read_fd)
    return mains


def _wait_first(mains: dict[int, str]) -> int:
    """Reap children until one of the programs exits; return its exit code."""
    while True:
        pid, status = os.waitpid(-1, 0)  # also reaps orphans handed to us as subreaper
        if pid in mains:
            _log(f"{mains[pid]} (pid {pid}) {_describe(status)}; stopping the session")
            return _exit_code(status)


def _children_and_group() -> list[int]:
    """Return the live processes of our group, and our children outside it (not us)."""
    me, group = os.getpid(), os.getpgrp()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        if state not in ("Z", "X") and (pgrp == group or ppid == me):
            found.append(int(entry.name))
    return found


def _reap_until(deadline: float) -> bool:
    """Reap children until none is left (True) or the deadline passes (False)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _terminate(grace_s: float) -> None:
    """Stop every process of the session: SIGTERM, then SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, _KILL_WAIT_S)):
        for pid in _children_and_group():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if _reap_until(time.monotonic() + wait_s):
            return
    _log("some processes did not exit after SIGKILL")


def _run(config: dict[str, Any]) -> int:
    try:
        os.chdir(config.get("cwd") or "/")
        mains = _start(config["programs"], float(config.get("ready_timeout_s", 20.0)))
        return _wait_first(mains)
    except (_Failed, OSError) as exc:
        _log(str(exc))
        return 127 if isinstance(exc, FileNotFoundError) else 1


def main(argv: list[str]) -> int:
    """Run the session described by ``argv[1]`` (JSON); return the exit code."""
    config = json.loads(argv[1])
    grace_s = float(config.get("grace_s", 5.0))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    _become_subreaper()
    code = 0
    try:
        code = _run(config)
    except _Stop as stop:
        _log(f"got {stop}; stopping the session")
    finally:
        while True:  # the handler raises at most once, so this runs at most twice
            try:
                _terminate(grace_s)
                break
            except _Stop:
                continue
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
