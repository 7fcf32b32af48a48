"""Many contenders for one lease, as objects in one process and as separate OS processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED_URL, LeaseMaker

CONTENDER = Path(__file__).with_name("_contender.py")


@pytest.mark.asyncio
async def test_one_winner_among_many_objects(new_lease: LeaseMaker) -> None:
    """40 objects try at once, round after round: one wins each round, at a higher epoch."""
    leases = [new_lease() for _ in range(40)]
    epochs: list[int] = []
    for _ in range(6):
        results = await asyncio.gather(
            *(lease.try_acquire(f"c{i}", 30.0) for i, lease in enumerate(leases))
        )
        winners = [i for i, record in enumerate(results) if record is not None]
        assert len(winners) == 1, f"winners: {winners}"
        (winner,) = winners
        record = results[winner]
        assert record is not None
        epochs.append(record.epoch)
        losers_read = await leases[(winner + 1) % len(leases)].read()
        assert losers_read is not None
        assert losers_read.holder == f"c{winner}"
        await leases[winner].release(f"c{winner}")
    assert epochs == sorted(set(epochs)), f"epochs must strictly grow: {epochs}"


class Contender:
    """A ``_contender.py`` process, spoken to over its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not raw:
            assert self.proc.stderr is not None
            err = (await self.proc.stderr.read()).decode(errors="replace")
            pytest.fail(f"a contender ended early:\n{err}")
        return raw.decode().strip()

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{text}\n".encode())
        await self.proc.stdin.drain()


@pytest.mark.asyncio
async def test_one_winner_among_processes(lease_key: str) -> None:
    """Four OS processes try at once: exactly one wins. Then they take turns; ordered by
    epoch, each holder acquired only after the previous one's last moment of holding, so
    the epoch strictly grows across holders and no two ever held it together."""
    procs, rounds = 4, 5
    contenders = [
        Contender(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(CONTENDER),
                SHARED_URL,
                lease_key,
                f"proc-{n}",
                str(rounds),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        )
        for n in range(procs)
    ]
    try:
        assert [await c.line() for c in contenders] == ["ready"] * procs
        await asyncio.gather(*(c.send("go") for c in contenders))
        firsts = [json.loads(await c.line())["first"] for c in contenders]
        assert sum(epoch is not None for epoch in firsts) == 1, f"first tries: {firsts}"
        await asyncio.gather(*(c.send("next") for c in contenders))

        async def holds(c: Contender) -> list[dict[str, Any]]:
            found = []
            while (line := await c.line()) != "done":
                found.append(json.loads(line))
            return found

        results = await asyncio.gather(*(holds(c) for c in contenders))
        for c in contenders:
            assert await asyncio.wait_for(c.proc.wait(), 30) == 0
    finally:
        for c in contenders:
            if c.proc.returncode is None:
                c.proc.kill()
                await c.proc.wait()

    turns = sorted((h for found in results for h in found), key=lambda h: h["epoch"])
    assert len(turns) == procs * rounds + 1
    epochs = [t["epoch"] for t in turns]
    assert epochs == sorted(set(epochs)), f"epochs must be distinct: {epochs}"
    for before, after in itertools.pairwise(turns):
        assert after["acquired_ms"] >= before["held_ms"], f"{after} overlaps {before}"
    assert max(firsts, key=lambda e: e or 0) == epochs[0], "the first winner had the first epoch"
