"""Dependency outages: PostgreSQL and Redis going away behind a served control plane.

Each dependency is reached through a :class:`TcpBalancer`, so a test can take it away as
a restart would (open connections reset, new ones refused) without touching the real
server other tests use. Expected outcomes:

- PostgreSQL away: ``/ready`` answers 503 saying the store is unreachable, requests that
  need it get 503 ``unavailable`` (never a 500), the agent stays connected; once it is
  back, ``/ready`` is 200 again, the session that ran runs on, and new commands flow.
- Redis away (redis hub): ``/ready`` answers 503 naming Redis, the agent held here is
  still served (its commands go through the store); once it is back, ``/ready`` is 200.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from agentsim import eventually, fast_settings, serve_control_plane

from streamspace_controlplane.store.postgres import PostgresStore
from streamspace_controlplane.store.sqlite import SqliteStore
from streamspace_sdk.testing import TcpBalancer

REDIS = ("127.0.0.1", 6379)


def closed_port() -> tuple[str, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "127.0.0.1", int(sock.getsockname()[1])


def take_away(balancer: TcpBalancer) -> list[tuple[str, int]]:
    """Reset every connection and refuse new ones; return the backends to restore."""
    backends, balancer.backends = balancer.backends, [closed_port()]
    balancer.cut()
    return backends


@pytest.mark.asyncio
async def test_postgresql_away_and_back(
    fresh_pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "streamspace.controlplane")
    parts = urlsplit(fresh_pg_dsn)
    async with TcpBalancer([(parts.hostname or "127.0.0.1", parts.port or 5432)]) as pg:
        through = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{pg.port}"))
        store = PostgresStore(through)
        async with (
            serve_control_plane(fast_settings(tmp_path / "home"), store) as harness,
            harness.http() as http,  # once it answers, its lifespan has connected the store
        ):
            await harness.template("desktop")
            sim = await harness.agent("pg-agent")
            before = await harness.session()
            await harness.wait_state(before.id, "running")
            backends = take_away(pg)
            ready = await http.get("/ready")
            assert ready.status_code == 503, ready.text
            assert ready.json()["problems"][0].startswith("store unreachable")
            refused = await http.post("/api/v1/sessions", json={"template": "desktop"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "unavailable"
            assert harness.cp.hub.local("pg-agent") is not None  # still connected
            # The background passes say what is wrong, once, without a traceback.
            await eventually(_logged(caplog, logging.WARNING, "pass failed: "), timeout_s=5)

            pg.backends = backends

            async def ready_again() -> bool:
                return (await http.get("/ready")).status_code == 200

            await eventually(ready_again, timeout_s=10)
            r = await http.post("/api/v1/sessions", json={"template": "desktop"})
            assert r.status_code == 201, r.text
            await harness.wait_state(r.json()["id"], "running", timeout_s=10)
            again = await harness.cp.store.get_session(before.id)
            assert again is not None
            assert again.state == "running"
            assert not sim.errors or all(e.code == "internal" for e in sim.errors)
            await eventually(_logged(caplog, logging.INFO, "pass works again"), timeout_s=5)
            failed = [r for r in caplog.records if "pass failed" in r.getMessage()]
            assert all(r.exc_info is None for r in failed)  # known: no traceback
            messages = [r.getMessage() for r in failed]
            assert len(messages) == len(set(messages))  # each distinct failure logged once


def _logged(
    caplog: pytest.LogCaptureFixture, level: int, text: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(r.levelno == level and text in r.getMessage() for r in caplog.records)

    return check


@pytest.mark.asyncio
async def test_redis_away_and_back(
    sqlite_store_path: Path, tmp_path: Path, redis_prefix: str
) -> None:
    async with TcpBalancer([REDIS]) as redis_lb:
        settings = fast_settings(
            tmp_path / "home",
            agent_hub_backend="redis",
            redis_url=f"redis://127.0.0.1:{redis_lb.port}/0",
            redis_key_prefix=redis_prefix,
            pod_name="solo",
            internal_url="http://127.0.0.1:9",
        )
        store = SqliteStore(sqlite_store_path)
        async with serve_control_plane(settings, store) as harness, harness.http() as http:
            await harness.template("desktop")
            await harness.agent("redis-agent")
            assert (await http.get("/ready")).status_code == 200
            backends = take_away(redis_lb)
            ready = await http.get("/ready")
            assert ready.status_code == 503, ready.text
            assert "redis unreachable" in ready.json()["problems"][0]
            # The agent held here is served: its start goes through the store.
            session = await harness.session()
            await harness.wait_state(session.id, "running", timeout_s=10)
            redis_lb.backends = backends

            async def ready_again() -> bool:
                return (await http.get("/ready")).status_code == 200

            await eventually(ready_again, timeout_s=10)


@pytest.fixture
def sqlite_store_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "streamspace.db"
