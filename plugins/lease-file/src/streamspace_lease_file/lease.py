"""The ``file`` lease: leader election between agent processes on one host.

The record is JSON in ``LEASE_FILE``. Every step (acquire, renew, release) reads, decides
and writes while holding an exclusive ``flock`` on a sidecar file, ``LEASE_FILE.lock``, so
of any number of processes at most one holds an unexpired lease. The record is written to
``LEASE_FILE.tmp``, synced, and renamed over ``LEASE_FILE``, so a crash mid-write leaves
the old record or the new one, never half of one. File and lock calls run in worker
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError, field_validator

from streamspace_sdk.clock import Clock
from streamspace_sdk.errors import LeaseError, LeaseLost
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.settings import StreamSpaceSettings, driver_settings

__all__ = ["DEFAULT_LEASE_FILE", "FileLease"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LEASE_FILE = Path("/var/lib/streamspace/docker-agent-lease")
"""The seed deployment guide's ``LEASE_FILE``."""

DIR_MODE = 0o755
"""Mode of the directories the lease creates: only the agent's user may create or replace
files in them (anyone who could would be able to forge or delete the lease); anyone may list
them."""
FILE_MODE = 0o644
"""Mode of the record and the lock file: a record holds no secret (a holder identity and
times), so operators and monitoring may read who leads; only the agent's user may write."""

_MAX_RECORD_BYTES = 4096
"""A record is about 200 bytes; a larger file is not one, so it is never overwritten."""
_MAX_EPOCH = 2**63 - 1
"""The largest epoch a control plane can store (a signed 64-bit column)."""
_EPOCH_TEXT = re.compile(rb'"epoch"\s*:\s*(\d+)')


class FileLease(Lease):
    """A lease held in a file that every agent process on this host can reach.

    Expiry follows the injected clock's wall time, not whether the holder's process is
    alive: a holder that is frozen (SIGSTOP, ``docker pause``) or hung loses the lease once
    its duration has passed without a renewal, like one that died.

    The epoch grows by one at every change of holder and survives a release. A missing or
    corrupt file is never trusted: the next holder's epoch is then above any epoch the lost
    record could have held (see :meth:`_epoch_floor`), because the control plane refuses an
    agent whose epoch is lower than the highest it has seen.
    """

    name = "file"
    capabilities = frozenset({"exclusive", "clock"})

    class Settings(StreamSpaceSettings):
        """Settings of the ``file`` lease, read from the environment."""

        lease_file: Path = DEFAULT_LEASE_FILE
        """Where the record lives (``~`` is expanded). Every replica on the host must name the
        same file, so the path must be absolute; ``LEASE_FILE.lock`` and ``LEASE_FILE.tmp``
        are made beside it."""

        @field_validator("lease_file", mode="before")
        @classmethod
        def _check_path(cls, value: object) -> object:
            if not isinstance(value, str | Path):
                return value
            text = str(value)
            if text.endswith("/"):
                raise ValueError(f"{text!r} names a directory; give the path of a file in it")
            if "\0" in text:
                raise ValueError("a path cannot contain a NUL character")
            try:
                path = Path(text).expanduser()
            except RuntimeError as exc:  # ~user with no such user, or no home directory
                raise ValueError(f"cannot expand {text!r}: {exc}") from None
            if not path.is_absolute():
                # Replicas started in different working directories would contend for
                # different files, and each would lead.
                raise ValueError(f"{text!r} is relative; give an absolute path (or ~/...)")
            if path.name in ("", ".", ".."):
                raise ValueError(f"{text!r} names a directory; give the path of a file in it")
            return path

    def __init__(
        self, settings: StreamSpaceSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        settings = driver_settings(FileLease.Settings, settings, "FileLease")
        super().__init__(settings, clock=clock)
        self.config: FileLease.Settings = settings
        self.path: Path = settings.lease_file
        """The record: ``LEASE_FILE``."""
        self.lock_path: Path = self.path.with_name(self.path.name + ".lock")
        """The file the lock is taken on. Not the record itself: replacing the record gives
        it a new inode, and a lock on the old inode would exclude nobody."""
        self.tmp_path: Path = self.path.with_name(self.path.name + ".tmp")
        """Where a new record is written before it is renamed over the old one. One fixed
        name is safe because only the lock holder writes, and a crash leaves one stale file
        that the next write truncates."""

    # -- the steps, each one atomic under the lock ---------------------------------------------

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        return await self._locked(lambda: self._acquire_step(holder, duration_s))

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        return await self._locked(lambda: self._renew_step(holder, duration_s))

    async def _release(self, holder: str) -> None:
        await self._locked(lambda: self._release_step(holder))

    async def _read(self) -> LeaseRecord | None:
        # No lock: the record is only ever replaced whole, so a reader sees the old one or
        # the new one; and reading needs no write access to the directory.
        record, _ = await asyncio.to_thread(self._explained, self._load)
        return record

    def _acquire_step(self, holder: str, duration_s: float) -> LeaseRecord | None:
        now, expires = self.expiry(duration_s)
        old, last_epoch = self._load()
        if old is not None and old.holder != holder and old.is_held(now):
            return None
        if old is not None and old.holder == holder:
            record = old.model_copy(update={"renewed_at": now, "expires_at": expires})
        else:
            record = LeaseRecord(
                holder=holder,
                epoch=last_epoch + 1,
                acquired_at=now,
                renewed_at=now,
                expires_at=expires,
            )
        self._store(record)
        return record

    def _renew_step(self, holder: str, duration_s: float) -> LeaseRecord:
        now, expires = self.expiry(duration_s)
        old, _ = self._load()
        if old is None or old.holder != holder:
            now_held = f"held by {old.holder!r}" if old is not None and old.holder else "free"
            raise LeaseLost(f"{holder!r} no longer holds the file lease {self.path}: {now_held}")
        record = old.model_copy(update={"renewed_at": now, "expires_at": expires})
        self._store(record)
        return record

    def _release_step(self, holder: str) -> None:
        old, _ = self._load()
        if old is not None and old.holder == holder:
            now = self.clock.now()
            self._store(old.model_copy(update={"holder": "", "renewed_at": now, "expires_at": now}))

    # -- the file --------------------------------------------------------------------------------

    async def _locked(self, step: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._explained, self._with_lock, step)

    def _with_lock(self, step: Callable[[], T]) -> T:
        """Run ``step`` holding the exclusive lock (blocking: call it in a worker thread)."""
        while True:
            fd = self._open_lock()
            try:
                # flock, not lockf: flock locks belong to an open file, so two leases in one
                # process (threads) exclude each other too; POSIX locks are per process.
                fcntl.flock(fd, fcntl.LOCK_EX)
                if self._still_linked(fd):
                    return step()
            finally:
                os.close(fd)  # closing the file releases the lock

    def _open_lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.lock_path, flags, FILE_MODE)
        except FileNotFoundError:
            self._make_dirs(self.path.parent)
            return os.open(self.lock_path, flags, FILE_MODE)

    def _still_linked(self, fd: int) -> bool:
        """Whether the locked file is still the one at ``lock_path``: if someone deleted or
        replaced it, others lock the new one, so locking the old one excludes nobody."""
        try:
            here = os.stat(self.lock_path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    @staticmethod
    def _make_dirs(directory: Path) -> None:
        missing: list[Path] = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another replica made it first
                path.mkdir(mode=DIR_MODE)

    def _load(self) -> tuple[LeaseRecord | None, int]:
        """Return the stored record (``None`` if missing or corrupt) and the epoch to count on
        from: the record's, or :meth:`_epoch_floor` when there is no record to trust."""
        try:
            # Non-blocking, so that a FIFO put there by mistake cannot hang the step.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            # A file that was never made and one that was deleted (rm, a tmpfs emptied at
            # boot) look the same: count from the floor, so a lost file cannot reset epochs.
            return None, self._epoch_floor(b"")
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind == stat.S_IFDIR:
                raise LeaseError(
                    f"LEASE_FILE {self.path} is a directory; set LEASE_FILE to a file's path, "
                    f"e.g. {self.path / 'lease'}"
                )
            if kind != stat.S_IFREG:
                raise LeaseError(f"LEASE_FILE {self.path} is not a regular file")
            data = _read_at_most(fd, _MAX_RECORD_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > _MAX_RECORD_BYTES:
            raise LeaseError(
                f"LEASE_FILE {self.path} holds more than {_MAX_RECORD_BYTES} bytes, so it is "
                "not a lease record and is left alone; point LEASE_FILE at another path"
            )
        record, problem = _parse(data)
        if record is not None:
            return record, record.epoch
        floor = self._epoch_floor(data)
        log.warning(
            "LEASE_FILE %s holds no valid lease record (%s); treating the lease as free, "
            "the next holder gets epoch %d",
            self.path,
            problem,
            floor + 1,
        )
        return None, floor

    def _epoch_floor(self, data: bytes) -> int:
        """Return an epoch at least as high as any a lost record could have held.

        The control plane refuses an epoch below the highest it has seen, so a new holder
        must count on from above the lost one: from the highest epoch still legible in what
        is left, or from the clock in milliseconds, whichever is higher. Holders change far
        less often than once a millisecond, so epochs counted on from an earlier floor stay
        below a later one, unless the wall clock went back.
        """
        legible = [int(m) for m in _EPOCH_TEXT.findall(data)]
        return max(
            [int(self.clock.now().timestamp() * 1000), *(e for e in legible if e < _MAX_EPOCH)]
        )

    def _store(self, record: LeaseRecord) -> None:
        data = record.model_dump_json().encode() + b"\n"
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.path)
        # The rename is durable only once the directory is synced.
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _explained(self, call: Callable[..., T], *args: object) -> T:
        """Run ``call``, turning an ``OSError`` into a :class:`LeaseError` that says what to fix."""
        try:
            return call(*args)
        except OSError as exc:
            raise LeaseError(self._explain(exc)) from exc

    def _explain(self, exc: OSError) -> str:
        where = exc.filename if exc.filename is not None else self.path
        what = f"LEASE_FILE {self.path}: {where}: {exc.strerror or exc}"
        directory = self.path.parent
        if exc.errno in (errno.EACCES, errno.EPERM):
            name = self.path.name
            return (
                f"{what}; the agent's user needs write access to {directory} and to the "
                f"lease's files in it ({name}, {name}.lock, {name}.tmp)"
            )
        if exc.errno == errno.EROFS:
            return f"{what}; point LEASE_FILE at a writable file system"
        if exc.errno == errno.ENOTDIR:
            return f"{what}; a parent of LEASE_FILE is a file, not a directory"
        if exc.errno == errno.EISDIR:
            return f"{what}; set LEASE_FILE (and its .lock and .tmp) to paths of files"
        return what


def _parse(data: bytes) -> tuple[LeaseRecord | None, str]:
    """Return the record in ``data``, or ``None`` and what is wrong with it."""
    try:
        record = LeaseRecord.model_validate_json(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors()[:3]
        ]
        return None, "; ".join(problems)
    times: list[datetime] = [record.acquired_at, record.renewed_at, record.expires_at]
    if any(t.utcoffset() is None for t in times):
        return None, "times without a timezone"
    return record, ""


def _read_at_most(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0 and (chunk := os.read(fd, left)):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
