"""One contending process of ``test_concurrency``: ``python _contender.py URL KEY HOLDER ROUNDS``.

It prints ``ready``, and at ``go`` on stdin tries the lease once and prints
``{"first": epoch or null}``; the winner keeps it until ``next``. Then, ``ROUNDS`` times, it
takes the lease (retrying), notes Redis's TIME while holding it, releases it and prints
``{"epoch", "acquired_ms", "held_ms"}``. It prints ``done`` at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys

import redis.asyncio as aioredis
from pydantic import SecretStr

from streamspace_lease_redis import RedisLease


async def main(url: str, key: str, holder: str, rounds: int) -> None:
    lease = RedisLease(RedisLease.Settings(redis_url=SecretStr(url), lease_key=key))
    clock = aioredis.Redis.from_url(url)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(line: str) -> None:
        print(line, flush=True)

    async def hold(record_epoch: int, acquired_ms: float) -> None:
        seconds, micros = await clock.time()
        held_ms = int(seconds) * 1000 + int(micros) // 1000
        await lease.release(holder)
        say(json.dumps({"epoch": record_epoch, "acquired_ms": acquired_ms, "held_ms": held_ms}))

    say("ready")
    assert (await reader.readline()).strip() == b"go"
    first = await lease.try_acquire(holder, 30.0)
    say(json.dumps({"first": None if first is None else first.epoch}))
    assert (await reader.readline()).strip() == b"next"
    if first is not None:
        await hold(first.epoch, first.acquired_at.timestamp() * 1000)
    for _ in range(rounds):
        # A lease announces no release: contenders retry, as the elector does.
        while (record := await lease.try_acquire(holder, 30.0)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await hold(record.epoch, record.acquired_at.timestamp() * 1000)
    say("done")
    await lease.close()
    await clock.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
