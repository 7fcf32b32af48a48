"""A process that contends for the file lease, driven by the tests over its stdin and stdout.

``python lease_worker.py``, with ``LEASE_FILE`` in its environment (read by ``FileLease()``
as the agent would). It prints ``{"ready": <pid>}``, then answers each JSON command line
with one JSON line:

* ``{"op": "acquire" | "renew" | "release" | "read", "holder": ..., "duration_s": ...}``
  answers ``{"record": {...} | null}``;
* ``{"op": "hammer", "holder": ..., "times": n, "duration_s": ...}`` acquires and releases
  ``n`` times as fast as it can and answers ``{"epochs": [the epoch of each win]}``;
* any command may carry ``"now"`` (ISO time): the lease's clock then reads that time, as a
  ``FakeClock`` shared by every process would; without it the clock is the real one.

A StreamSpace error is answered ``{"error": "<class name>", "message": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from typing import Any

from streamspace_lease_file import FileLease
from streamspace_sdk.clock import SystemClock
from streamspace_sdk.errors import StreamSpaceError


class CommandClock(SystemClock):
    """The real clock, unless the last command set the time."""

    def __init__(self) -> None:
        self.at: datetime | None = None

    def now(self) -> datetime:
        return self.at if self.at is not None else super().now()


async def handle(lease: FileLease, command: dict[str, Any]) -> dict[str, Any]:
    op = command["op"]
    holder = command.get("holder", "")
    duration_s = float(command.get("duration_s", 15.0))
    if op == "acquire":
        record = await lease.try_acquire(holder, duration_s)
    elif op == "renew":
        record = await lease.renew(holder, duration_s)
    elif op == "release":
        await lease.release(holder)
        record = await lease.read()
    elif op == "read":
        record = await lease.read()
    elif op == "hammer":
        epochs = []
        for _ in range(int(command["times"])):
            won = await lease.try_acquire(holder, duration_s)
            if won is not None:
                epochs.append(won.epoch)
                await lease.release(holder)
        return {"epochs": epochs}
    else:
        raise ValueError(f"unknown op {op!r}")
    return {"record": None if record is None else record.model_dump(mode="json")}


def main() -> None:
    clock = CommandClock()
    lease = FileLease(clock=clock)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    while line := sys.stdin.readline():
        command = json.loads(line)
        clock.at = datetime.fromisoformat(command["now"]) if command.get("now") else None
        try:
            answer = asyncio.run(handle(lease, command))
        except StreamSpaceError as exc:
            answer = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
