"""Fixtures: the shared Redis at 127.0.0.1:6379, and Redis servers of the tests' own.

The shared Redis serves other test suites at the same time: every test uses its own
``LEASE_KEY`` and deletes its keys afterwards; nothing is flushed. Tests that kill Redis, or
need a password or TLS, start their own ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from streamspace_lease_redis import RedisLease
from streamspace_sdk.clock import Clock

pytest_plugins = ["streamspace_sdk.testing.plugin"]

SHARED_URL = "redis://127.0.0.1:6379/0"
"""The Redis every suite shares; CI starts it."""


def settings(url: str, key: str) -> RedisLease.Settings:
    """Lease settings for ``url`` and ``key``."""
    return RedisLease.Settings(redis_url=SecretStr(url), lease_key=key)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def lease_key() -> Iterator[str]:
    """A LEASE_KEY of this test's own on the shared Redis; its keys are deleted after."""
    key = f"test-lease-redis-{uuid.uuid4().hex}"
    yield key
    client = redis.Redis.from_url(SHARED_URL)
    try:
        client.delete(f"lease:{key}", f"lease:{key}:epoch")
    finally:
        client.close()


LeaseMaker = Callable[..., RedisLease]
"""``new_lease(url=SHARED_URL, key=<this test's>, clock=None)``."""


@pytest_asyncio.fixture
async def new_lease(lease_key: str) -> AsyncIterator[LeaseMaker]:
    """Build redis leases (on the shared Redis and this test's key by default), closed after."""
    made: list[RedisLease] = []

    def make(url: str = SHARED_URL, key: str = lease_key, clock: Clock | None = None) -> RedisLease:
        lease = RedisLease(settings(url, key), clock=clock)
        made.append(lease)
        return lease

    yield make
    for lease in made:
        await lease.close()


@pytest_asyncio.fixture
async def plain() -> AsyncIterator[aioredis.Redis]:
    """A plain client of the shared Redis, to look at what the lease stored."""
    client = aioredis.Redis.from_url(SHARED_URL, decode_responses=True)
    yield client
    await client.aclose()


async def server_time_ms(client: aioredis.Redis) -> int:
    """Redis's ``TIME`` in milliseconds."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class RedisServer:
    """A ``redis-server`` of the test's own, without persistence, that a test can kill -9.

    ``start()`` returns once the server logs that it accepts connections; ``start()`` after
    ``kill()`` brings it back on the same port, empty, as a restarted Redis without
    persistence would be.
    """

    def __init__(self, password: str, *, tls: Path | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.tls = tls
        """Directory of ``server.pem``, ``server.key`` and ``ca.pem`` to serve TLS with."""
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.log: list[str] = []

    def url(self, password: str | None = None, *, ca: str = "ca.pem") -> str:
        """``redis://`` (``rediss://`` trusting ``ca`` with TLS) with ``password`` (by default
        the right one)."""
        secret = self.password if password is None else password
        if self.tls is None:
            return f"redis://:{secret}@127.0.0.1:{self.port}/0"
        return f"rediss://:{secret}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls / ca}"

    async def start(self) -> None:
        args = ["--save", "", "--appendonly", "no", "--daemonize", "no", "--bind", "127.0.0.1"]
        args += ["--requirepass", self.password]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.tls / "server.pem")]
            args += ["--tls-key-file", str(self.tls / "server.key")]
            args += ["--tls-ca-cert-file", str(self.tls / "ca.pem")]
        self._proc = await asyncio.create_subprocess_exec(
            "redis-server", *args, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT
        )
        ready = asyncio.Event()
        self._drain = asyncio.create_task(self._read(self._proc, ready))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({waiting, self._drain}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not ready.is_set():
            await self.kill()
            pytest.fail("redis-server did not start:\n" + "\n".join(self.log[-20:]))

    async def kill(self) -> None:
        """SIGKILL the server and wait for it to be gone."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self.log.append(line.decode(errors="replace").rstrip())
            if "Ready to accept connections" in self.log[-1]:
                ready.set()


@pytest_asyncio.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A password-protected ``redis-server`` of this test's own."""
    server = RedisServer(f"pw-{uuid.uuid4().hex}")
    await server.start()
    yield server
    await server.kill()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 it signed, and an unrelated CA (``other.pem``),
    made with the ``openssl`` command."""
    where = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    new_key = ["-newkey", "rsa:2048", "-nodes"]
    for ca in ("ca", "other"):
        openssl(
            "req",
            "-x509",
            *new_key,
            "-days",
            "2",
            "-subj",
            f"/CN=test {ca}",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
        )
    openssl(
        "req", *new_key, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"
    )
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "server.pem",
    )
    return where
