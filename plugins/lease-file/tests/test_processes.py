"""Many OS processes contend for one lease file: one wins at a time, epochs only grow."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import WorkerFactory

from streamspace_lease_file import FileLease
from streamspace_sdk.lease import LeaseRecord
from streamspace_sdk.testing.clock import FakeClock

PROCESSES = 6
DURATION_S = 15.0


@pytest.mark.asyncio
async def test_one_winner_per_round(lease_path: Path, start_worker: WorkerFactory) -> None:
    """Processes ask at once, round after round: exactly one holds the lease after each
    round, and the epoch grows whenever the holder changes (by release or by expiry).

    The processes share a fake time, sent with each command, so expiry needs no waiting.
    """
    workers = await asyncio.gather(*(start_worker(lease_path) for _ in range(PROCESSES)))
    rng = random.Random(20260101)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    last_holder, last_epoch, changes = "", 0, 0
    for round_no in range(40):
        answers = await asyncio.gather(
            *(
                w.call("acquire", holder=f"p{i}", duration_s=DURATION_S, now=now.isoformat())
                for i, w in enumerate(workers)
            )
        )
        won = [(i, LeaseRecord(**a["record"])) for i, a in enumerate(answers) if a["record"]]
        assert len(won) == 1, f"round {round_no}: {[i for i, _ in won]} won"
        ((winner, record),) = won
        if record.holder != last_holder:
            assert record.epoch > last_epoch, f"round {round_no}: the epoch did not grow"
            changes += 1
        else:
            assert record.epoch == last_epoch, f"round {round_no}: a renewal changed the epoch"
        last_holder, last_epoch = record.holder, record.epoch
        move = rng.choice(["release", "expire", "wait"])
        if move == "release":
            await workers[winner].call("release", holder=f"p{winner}", now=now.isoformat())
            last_holder = ""  # a release is a change of holder, even if the same one wins
        elif move == "expire":
            now += timedelta(seconds=DURATION_S * 1.05)
        else:
            now += timedelta(seconds=DURATION_S * 0.3)
    assert changes > 10, "the rounds should change holders often"


@pytest.mark.asyncio
async def test_hammering_processes_never_share_an_epoch(
    lease_path: Path, start_worker: WorkerFactory
) -> None:
    """Processes acquire and release as fast as they can, on the real clock. Every grant
    is of a free lease, so each bumps the epoch by one: two processes granted the lease
    together would both write the same epoch."""
    workers = await asyncio.gather(*(start_worker(lease_path) for _ in range(PROCESSES)))
    answers = await asyncio.gather(
        *(
            w.call("hammer", holder=f"p{i}", times=150, duration_s=60.0)
            for i, w in enumerate(workers)
        )
    )
    epochs = sorted(e for a in answers for e in a["epochs"])
    assert len(set(epochs)) == len(epochs), "two processes got the lease at the same epoch"
    assert epochs == list(range(epochs[0], epochs[0] + len(epochs))), "an epoch was skipped"
    winners = sum(1 for a in answers if a["epochs"])
    assert winners > 1, "only one process ever won: there was no contention"


@pytest.mark.asyncio
async def test_stopped_holder_loses_the_lease(
    lease_path: Path, start_worker: WorkerFactory
) -> None:
    """A holder whose process is frozen but alive stops renewing; once its duration has
    passed, another process takes the lease at a higher epoch, and the frozen holder, when
    it runs again, finds it has lost it.

    The taker's clock is a fake one started at the real time, so the holder's duration
    passes by moving it, not by waiting.
    """
    holder = await start_worker(lease_path)
    held = await holder.call("acquire", holder="frozen", duration_s=DURATION_S)
    first = LeaseRecord(**held["record"])
    os.kill(holder.pid, signal.SIGSTOP)
    await asyncio.to_thread(os.waitid, os.P_PID, holder.pid, os.WSTOPPED | os.WNOWAIT)

    clock = FakeClock(start=datetime.now(UTC))
    taker = FileLease(FileLease.Settings(lease_file=lease_path), clock=clock)
    assert await taker.try_acquire("taker", DURATION_S) is None, "taken before expiry"
    await clock.advance(DURATION_S + 1.0)
    second = await taker.try_acquire("taker", DURATION_S)
    assert second is not None, "a frozen holder's expired lease must be granted"
    assert second.epoch > first.epoch

    os.kill(holder.pid, signal.SIGCONT)
    lost = await holder.call("renew", holder="frozen", duration_s=DURATION_S)
    assert lost["error"] == "LeaseLost", lost
    assert "'frozen' no longer holds" in lost["message"]
    assert "held by 'taker'" in lost["message"]
    again = await holder.call("acquire", holder="frozen", duration_s=DURATION_S)
    assert again == {"record": None}


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that processes started with ``obey_permissions`` cannot write to.

    Its mode, 0o555, forbids writing even to its owner; root ignores modes, so the workers
    run without ``CAP_DAC_OVERRIDE`` (see ``start_worker``), and then it binds root too.
    """
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    yield readonly
    readonly.chmod(0o755)


@pytest.mark.parametrize("under", ["lease", "missing/lease"])
@pytest.mark.asyncio
async def test_unwritable_directory_is_a_clear_error(
    readonly_dir: Path, start_worker: WorkerFactory, under: str
) -> None:
    path = readonly_dir / under
    worker = await start_worker(path, obey_permissions=True)
    answer = await worker.call("acquire", holder="a", duration_s=DURATION_S)
    assert answer["error"] == "LeaseError", answer
    message = answer["message"]
    assert message.startswith(f"LEASE_FILE {path}: ")
    assert "Permission denied" in message
    assert f"needs write access to {path.parent}" in message
    assert not os.listdir(readonly_dir), "nothing may be made in a read-only directory"
