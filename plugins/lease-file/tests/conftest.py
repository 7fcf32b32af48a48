"""Fixtures: lease files in a temporary directory, and real processes that contend for them.

Nothing is mocked: leases are real files, locks are real ``flock`` calls, and "another
process" is another Python interpreter running ``lease_worker.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

pytest_plugins = ["streamspace_sdk.testing.plugin"]

WORKER = Path(__file__).with_name("lease_worker.py")
ANSWER_TIMEOUT_S = 60.0
"""How long a worker may take to answer one command before the test fails (a safety net:
a healthy worker answers in milliseconds)."""
_CAP_DAC_OVERRIDE = 1
_DROP_DAC_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-fowner", "--"]
"""util-linux's setpriv: run a command as this user, but without the capabilities that let
root write where a file's mode forbids it."""
_WAITER = re.compile(r"-> FLOCK\s+ADVISORY\s+WRITE\s+\S+\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s")


@pytest.fixture
def lease_path(tmp_path: Path) -> Path:
    """A LEASE_FILE whose directory does not exist yet."""
    return tmp_path / "state" / "lease"


class Worker:
    """One ``lease_worker.py`` process: send it a command, get its answer."""

    def __init__(self, proc: asyncio.subprocess.Process, pid: int, stderr: Path) -> None:
        self.proc = proc
        self.pid = pid
        self._stderr = stderr

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send ``{"op": op, **args}`` and return the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._answer()

    async def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), ANSWER_TIMEOUT_S)
        if not line:
            await self.proc.wait()
            raise AssertionError(
                f"lease worker {self.pid} exited with {self.proc.returncode}: "
                f"{self._stderr.read_text()}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def close(self) -> None:
        """Kill the process (a stopped one too) and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await self.proc.wait()


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest_asyncio.fixture
async def start_worker(tmp_path: Path) -> AsyncIterator[WorkerFactory]:
    """Start lease workers on a LEASE_FILE; every one is killed when the test ends."""
    started: list[Worker] = []

    async def start(lease_file: Path, *, obey_permissions: bool = False) -> Worker:
        """Start a worker; with ``obey_permissions``, one that file modes apply to even if
        this process is root (it runs without ``CAP_DAC_OVERRIDE``)."""
        stderr = tmp_path / f"worker-{len(started)}.stderr"
        command = [sys.executable, str(WORKER)]
        if obey_permissions and _has_dac_override():
            command = [*_DROP_DAC_OVERRIDE, *command]
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "LEASE_FILE": str(lease_file)},
            )
        worker = Worker(proc, proc.pid, stderr)
        started.append(worker)
        ready = await worker._answer()
        assert ready == {"ready": proc.pid}
        return worker

    yield start
    for worker in started:
        await worker.close()


def _has_dac_override() -> bool:
    """Whether this process may ignore file modes (root, usually)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << _CAP_DAC_OVERRIDE))
    raise AssertionError("/proc/self/status shows no CapEff line")


async def blocked_on(path: Path, timeout_s: float = 10.0) -> None:
    """Return once some thread or process waits for an exclusive ``flock`` on ``path``.

    The kernel lists waiters in ``/proc/locks`` and offers no way to be told of one, so
    this looks every few milliseconds; it fails after ``timeout_s``.
    """
    want = _file_id(path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while want not in _flock_waiters():
        if loop.time() > deadline:
            raise AssertionError(f"nobody waited for the lock on {path} within {timeout_s}s")
        await asyncio.sleep(0.005)


def _file_id(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return os.major(info.st_dev), os.minor(info.st_dev), info.st_ino


def _flock_waiters() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file some thread or process waits to ``flock``."""
    text = Path("/proc/locks").read_text()
    return {(int(m[1], 16), int(m[2], 16), int(m[3])) for m in _WAITER.finditer(text)}
