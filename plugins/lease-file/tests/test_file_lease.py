"""The file lease in one process: what it stores, how it locks, repairs and fails."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import blocked_on

from streamspace_lease_file import DEFAULT_LEASE_FILE, FileLease
from streamspace_sdk import drivers
from streamspace_sdk.errors import ConfigError, LeaseError, LeaseLost
from streamspace_sdk.lease import Lease
from streamspace_sdk.leases import MemoryLease
from streamspace_sdk.testing.clock import FakeClock

DURATION_S = 15.0


def make(path: Path, clock: FakeClock) -> FileLease:
    return FileLease(FileLease.Settings(lease_file=path), clock=clock)


def clock_floor(clock: FakeClock) -> int:
    """The clock-based epoch floor: milliseconds since 1970 by ``clock``."""
    return int(clock.now().timestamp() * 1000)


def stored(path: Path) -> dict[str, Any]:
    """The record on disk, as JSON."""
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def content_of(path: Path) -> bytes:
    return path.read_bytes()


def plant(path: Path, content: bytes) -> None:
    """Put ``content`` where the lease file goes, as a crash or a person might."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def make_dirs(directory: Path) -> None:
    directory.mkdir(parents=True)


def remove(path: Path) -> None:
    path.unlink()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def locked(lease_path: Path) -> Iterator[int]:
    """Hold the lease's lock from outside the lease, as another process's step would."""
    lease_path.parent.mkdir(parents=True)
    fd = os.open(lease_path.with_name("lease.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield fd
    os.close(fd)


# -- what is stored ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_record_is_json_in_lease_file(lease_path: Path, fake_clock: FakeClock) -> None:
    lease = make(lease_path, fake_clock)
    record = await lease.try_acquire("agent-a", DURATION_S)
    assert record is not None
    assert stored(lease_path) == {
        "holder": "agent-a",
        "epoch": record.epoch,
        "acquired_at": "2026-01-01T00:00:00Z",
        "renewed_at": "2026-01-01T00:00:00Z",
        "expires_at": "2026-01-01T00:00:15Z",
    }
    assert listing(lease_path.parent) == ["lease", "lease.lock"]


@pytest.mark.asyncio
async def test_creates_directories_and_files_with_their_modes(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    path = tmp_path / "var" / "lib" / "streamspace" / "lease"
    await make(path, fake_clock).try_acquire("agent-a", DURATION_S)
    for directory in (tmp_path / "var", tmp_path / "var" / "lib", path.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755 & ~umask(), directory
    for file in (path, path.with_name("lease.lock")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644 & ~umask(), file


@pytest.mark.asyncio
async def test_first_epoch_is_above_the_clock_floor(
    lease_path: Path, fake_clock: FakeClock
) -> None:
    """A missing file may be a deleted one, so its epoch counts on from the clock."""
    record = await make(lease_path, fake_clock).try_acquire("agent-a", DURATION_S)
    assert record is not None
    assert record.epoch == clock_floor(fake_clock) + 1


@pytest.mark.asyncio
async def test_deleted_file_does_not_reset_the_epoch(
    lease_path: Path, fake_clock: FakeClock
) -> None:
    lease = make(lease_path, fake_clock)
    epochs = []
    for holder in ("a", "b", "c"):
        record = await lease.try_acquire(holder, DURATION_S)
        assert record is not None
        epochs.append(record.epoch)
        await lease.release(holder)
    remove(lease_path)
    await fake_clock.advance(1.0)
    record = await lease.try_acquire("d", DURATION_S)
    assert record is not None
    assert record.epoch > max(epochs)


@pytest.mark.asyncio
async def test_release_keeps_the_epoch_on_disk(lease_path: Path, fake_clock: FakeClock) -> None:
    lease = make(lease_path, fake_clock)
    record = await lease.try_acquire("agent-a", DURATION_S)
    assert record is not None
    await fake_clock.advance(3.0)
    await lease.release("agent-a")
    on_disk = stored(lease_path)
    assert on_disk["holder"] == ""
    assert on_disk["epoch"] == record.epoch
    assert on_disk["expires_at"] == "2026-01-01T00:00:03Z"


@pytest.mark.asyncio
async def test_renew_of_a_released_lease_is_lost(lease_path: Path, fake_clock: FakeClock) -> None:
    lease = make(lease_path, fake_clock)
    await lease.try_acquire("agent-a", DURATION_S)
    await lease.release("agent-a")
    with pytest.raises(LeaseLost, match=r"'agent-a' no longer holds .*: free"):
        await lease.renew("agent-a", DURATION_S)


@pytest.mark.asyncio
async def test_renew_of_a_never_taken_lease_is_lost(
    lease_path: Path, fake_clock: FakeClock
) -> None:
    with pytest.raises(LeaseLost):
        await make(lease_path, fake_clock).renew("agent-a", DURATION_S)
    assert listing(lease_path.parent) == ["lease.lock"], "a failed renew must not write"


@pytest.mark.asyncio
async def test_read_of_a_missing_file_is_none_and_writes_nothing(
    lease_path: Path, fake_clock: FakeClock
) -> None:
    assert await make(lease_path, fake_clock).read() is None
    assert listing(lease_path.parent.parent) == [], "a read must not make directories"


@pytest.mark.asyncio
async def test_crash_leftover_temp_file_is_harmless(
    lease_path: Path, fake_clock: FakeClock
) -> None:
    """A crash between writing ``LEASE_FILE.tmp`` and renaming it leaves the old record."""
    lease = make(lease_path, fake_clock)
    first = await lease.try_acquire("agent-a", DURATION_S)
    plant(lease_path.with_name("lease.tmp"), b'{"holder": "half-writ')
    read = await lease.read()
    assert read == first
    again = await lease.try_acquire("agent-a", DURATION_S)
    assert again is not None
    assert listing(lease_path.parent) == ["lease", "lease.lock"]


# -- locking -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_acquire_waits_for_the_lock_in_a_thread(
    lease_path: Path, fake_clock: FakeClock, locked: int
) -> None:
    """While another step holds ``LEASE_FILE.lock``, an acquire waits for it, off the loop."""
    lock_path = lease_path.with_name("lease.lock")
    # Should the lease block the event loop in flock, this test could never release the
    # lock itself; the timer does, so the test fails instead of hanging.
    rescue = threading.Timer(20.0, fcntl.flock, (locked, fcntl.LOCK_UN))
    rescue.start()
    try:
        task = asyncio.create_task(make(lease_path, fake_clock).try_acquire("a", DURATION_S))
        await blocked_on(lock_path)
        assert not task.done()
        assert listing(lease_path.parent) == ["lease.lock"], "written without the lock"
        fcntl.flock(locked, fcntl.LOCK_UN)
        record = await task
    finally:
        rescue.cancel()
    assert record is not None
    assert record.holder == "a"


@pytest.mark.asyncio
async def test_lock_file_replaced_while_waiting_is_locked_again(
    lease_path: Path, fake_clock: FakeClock, locked: int
) -> None:
    """A lock taken on a lock file that was deleted meanwhile excludes nobody: retake it."""
    lock_path = lease_path.with_name("lease.lock")
    task = asyncio.create_task(make(lease_path, fake_clock).try_acquire("a", DURATION_S))
    await blocked_on(lock_path)
    lock_path.unlink()
    new_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(new_fd, fcntl.LOCK_EX)
        fcntl.flock(locked, fcntl.LOCK_UN)
        await blocked_on(lock_path)  # the waiter moved to the new file
        assert not task.done()
        assert listing(lease_path.parent) == ["lease.lock"]
    finally:
        os.close(new_fd)
    record = await task
    assert record is not None


# -- corrupt records -----------------------------------------------------------------------

VALID = (
    b'{"holder": "old", "epoch": 41, "acquired_at": "2026-01-01T00:00:00Z", '
    b'"renewed_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T01:00:00Z"}'
)
CORRUPT = {
    "garbage bytes": b"\x00\xff\xfe\x13not a lease at all\x80",
    "empty": b"",
    "truncated JSON": VALID[: VALID.index(b"acquired_at") + 20],
    "not an object": b"[41]",
    "missing fields": b'{"holder": "old", "epoch": 41}',
    "wrong types": VALID.replace(b"41", b'"forty-one"'),
    "negative epoch": VALID.replace(b"41", b"-41"),
    "times without a timezone": VALID.replace(b"Z", b""),
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
@pytest.mark.asyncio
async def test_corrupt_file_is_repaired(
    lease_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    """A corrupt record is free (even one that seems to name an unexpired holder), with a
    warning naming the file, and the next epoch is above the clock-based floor."""
    plant(lease_path, content)
    lease = make(lease_path, fake_clock)
    with caplog.at_level(logging.WARNING, logger="streamspace_lease_file"):
        record = await lease.try_acquire("new", DURATION_S)
    assert record is not None
    assert record.epoch == clock_floor(fake_clock) + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"LEASE_FILE {lease_path} holds no valid lease record" in warnings[0]
    assert stored(lease_path)["holder"] == "new"
    assert await lease.read() == record


@pytest.mark.asyncio
async def test_repair_counts_on_from_a_legible_epoch_above_the_clock(
    lease_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """If the lost record's epoch can still be read and is above the clock, count from it."""
    high = clock_floor(fake_clock) + 10**9
    plant(lease_path, b'{"holder": "old", "epoch": %d, "acquired_at": "2026-01' % high)
    record = await make(lease_path, fake_clock).try_acquire("new", DURATION_S)
    assert record is not None
    assert record.epoch == high + 1
    assert str(high + 1) in caplog.text


@pytest.mark.asyncio
async def test_repair_ignores_an_epoch_no_control_plane_could_hold(
    lease_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    plant(lease_path, b'{"epoch": %d, "holder": ' % 2**64)
    record = await make(lease_path, fake_clock).try_acquire("new", DURATION_S)
    assert record is not None
    assert record.epoch == clock_floor(fake_clock) + 1


@pytest.mark.asyncio
async def test_corrupt_file_is_not_renewed_released_or_read(
    lease_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Only an acquire repairs: nobody can prove they held a lost record."""
    plant(lease_path, CORRUPT["truncated JSON"])
    lease = make(lease_path, fake_clock)
    with pytest.raises(LeaseLost):
        await lease.renew("old", DURATION_S)
    await lease.release("old")
    assert await lease.read() is None
    assert content_of(lease_path) == CORRUPT["truncated JSON"]
    assert caplog.text.count(f"LEASE_FILE {lease_path} holds no valid lease record") == 3


@pytest.mark.asyncio
async def test_large_file_is_left_alone(lease_path: Path, fake_clock: FakeClock) -> None:
    """A file far larger than a record is not one (LEASE_FILE points at the wrong file)."""
    content = b"important: data\n" * 1000
    plant(lease_path, content)
    with pytest.raises(LeaseError, match=rf"LEASE_FILE {lease_path} holds more than 4096 bytes"):
        await make(lease_path, fake_clock).try_acquire("new", DURATION_S)
    assert content_of(lease_path) == content


# -- clear errors --------------------------------------------------------------------------


STEPS: dict[str, Callable[[FileLease], Awaitable[object]]] = {
    "acquire": lambda lease: lease.try_acquire("a", DURATION_S),
    "renew": lambda lease: lease.renew("a", DURATION_S),
    "release": lambda lease: lease.release("a"),
    "read": lambda lease: lease.read(),
}


@pytest.mark.parametrize("step", STEPS.values(), ids=STEPS.keys())
@pytest.mark.asyncio
async def test_lease_file_that_is_a_directory(
    lease_path: Path, fake_clock: FakeClock, step: Callable[[FileLease], Awaitable[object]]
) -> None:
    make_dirs(lease_path)
    with pytest.raises(LeaseError, match=rf"LEASE_FILE {lease_path} is a directory"):
        await step(make(lease_path, fake_clock))
    assert listing(lease_path) == []


@pytest.mark.asyncio
async def test_lease_file_that_is_not_a_regular_file(
    lease_path: Path, fake_clock: FakeClock
) -> None:
    make_dirs(lease_path.parent)
    os.mkfifo(lease_path)
    with pytest.raises(LeaseError, match=rf"LEASE_FILE {lease_path} is not a regular file"):
        await make(lease_path, fake_clock).try_acquire("a", DURATION_S)


@pytest.mark.parametrize("under", ["plain_file/lease", "plain_file/deeper/lease"])
@pytest.mark.asyncio
async def test_parent_that_is_a_file(tmp_path: Path, fake_clock: FakeClock, under: str) -> None:
    """No one, root included, can make a file under a regular file."""
    plant(tmp_path / "plain_file", b"a regular file\n")
    path = tmp_path / under
    lease = make(path, fake_clock)
    for call in (lease.try_acquire("a", DURATION_S), lease.read()):
        with pytest.raises(LeaseError) as caught:
            await call
        message = str(caught.value)
        assert message.startswith(f"LEASE_FILE {path}: ")
        assert "Not a directory" in message
        assert "a parent of LEASE_FILE is a file" in message


@pytest.mark.asyncio
async def test_lock_file_that_is_a_directory(lease_path: Path, fake_clock: FakeClock) -> None:
    make_dirs(lease_path.with_name("lease.lock"))
    with pytest.raises(LeaseError, match=rf"LEASE_FILE {lease_path}: .*lease\.lock: Is a dir"):
        await make(lease_path, fake_clock).try_acquire("a", DURATION_S)


# -- settings and loading ------------------------------------------------------------------


def test_default_lease_file_is_the_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEASE_FILE", raising=False)
    assert FileLease.Settings().lease_file == DEFAULT_LEASE_FILE
    assert Path("/var/lib/streamspace/docker-agent-lease") == DEFAULT_LEASE_FILE


@pytest.mark.asyncio
async def test_lease_file_from_the_environment_with_home_expanded(
    tmp_path: Path, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LEASE_FILE", "~/leases/agent")
    lease: Lease = drivers.load_driver(drivers.LEASES, "file", clock=fake_clock)
    assert isinstance(lease, FileLease)
    assert lease.path == tmp_path / "leases" / "agent"
    await lease.try_acquire("a", DURATION_S)
    assert stored(tmp_path / "leases" / "agent")["holder"] == "a"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("leases/agent", "is relative"),
        ("/var/lib/streamspace/", "names a directory"),
        ("/var/lib/streamspace/..", "names a directory"),
        ("~no-such-user-streamspace/lease", "cannot expand"),
    ],
)
def test_bad_lease_file_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str, why: str
) -> None:
    monkeypatch.setenv("LEASE_FILE", value)
    with pytest.raises(ConfigError, match=rf"^LEASE_FILE: .*{why}"):
        FileLease()


def test_other_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"FileLease needs FileLease\.Settings"):
        FileLease(MemoryLease.Settings())


def test_registered_as_the_file_lease() -> None:
    cls: type[Lease] = drivers.load_driver_class(drivers.LEASES, "file")
    assert cls is FileLease
    assert FileLease.capabilities == {"exclusive", "clock"}


@pytest.mark.asyncio
async def test_expiry_follows_the_injected_clock(lease_path: Path) -> None:
    """Expiry is decided by the clock given to the lease, not by the computer's."""
    late = FakeClock(start=datetime(2030, 1, 1, tzinfo=UTC))
    early = FakeClock(start=datetime(2020, 1, 1, tzinfo=UTC))
    await make(lease_path, early).try_acquire("early", DURATION_S)
    record = await make(lease_path, late).try_acquire("late", DURATION_S)
    assert record is not None, "by the late clock the early holder's lease is long expired"
    assert await make(lease_path, early).try_acquire("early", DURATION_S) is None
