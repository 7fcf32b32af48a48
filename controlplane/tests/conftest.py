"""Fixtures shared by the control plane's tests.

``store`` is a clean, migrated store, once on each driver: ``sqlite`` (a fresh file under
``tmp_path``) and ``postgres`` (one database created for the test session, migrated once,
truncated before every test, dropped at the end). ``sqlite_store`` is the SQLite one alone.

PostgreSQL is found at ``STREAMSPACE_TEST_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), which needs the right to create
databases. When it does not answer, the PostgreSQL tests fail (they are never skipped: CI
starts it); SQLite tests still run.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from agentsim import Harness, fast_settings, serve_control_plane
from apikit import isolate
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamspace_controlplane.store.base import Store, StoreError
from streamspace_controlplane.store.postgres import PostgresStore
from streamspace_controlplane.store.sqlite import SqliteStore

T = TypeVar("T")

PG_DSN_VARIABLE = "STREAMSPACE_TEST_PG_DSN"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
STORE_DRIVERS = ("sqlite", "postgres")
TEST_DATABASE_PREFIX = "streamspace_test_"
STALE_AFTER_S = 6 * 3600
"""A test database older than this was left by a killed run; the next run drops it."""


class _TestSettings(BaseSettings):
    """What the tests read from the environment."""

    model_config = SettingsConfigDict(env_prefix="STREAMSPACE_TEST_", env_ignore_empty=True)

    pg_dsn: str = DEFAULT_PG_DSN
    """``STREAMSPACE_TEST_PG_DSN``: a database on the server the tests may create others on."""


def admin_dsn() -> str:
    """Return the DSN of the PostgreSQL database used to create test databases."""
    return _TestSettings().pg_dsn


def dsn_for(database: str) -> str:
    """Return :func:`admin_dsn` pointed at ``database``."""
    parts = urlsplit(admin_dsn())
    return urlunsplit(parts._replace(path=f"/{database}"))


def run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on an event loop of its own thread.

    Session fixtures use it, so they neither need a test's event loop nor disturb it.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def main() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=main, name="pg-fixture")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _admin(*statements: str) -> None:
    """Run statements (outside a transaction) on the admin database.

    Before them, drop test databases left by runs that were killed before their teardown
    (their names start with their creation time; a live run is never that old).
    """
    admin = PostgresStore(admin_dsn(), max_size=1, connect_timeout_s=2)
    await admin.connect()
    try:
        async with admin._connection() as conn:
            rows = await conn.fetch(
                "SELECT datname FROM pg_catalog.pg_database d WHERE datname LIKE ? AND NOT "
                "EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.datid = d.oid)",
                f"{TEST_DATABASE_PREFIX}%",
            )
            for row in rows:
                name = str(row["datname"])
                if _created_at(name) < time.time() - STALE_AFTER_S:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for sql in statements:
                await conn.execute(sql)
    finally:
        await admin.close()


def _created_at(name: str) -> float:
    """Return when a test database was created, from its name (now if it has none)."""
    digits = name.removeprefix(TEST_DATABASE_PREFIX)
    if len(digits) != 20 or not all(c in "0123456789abcdef" for c in digits):
        return time.time()
    return float(int(digits[:8], 16))


def create_database() -> str:
    """Create an empty database ``streamspace_test_<hex>``; return its DSN.

    The hex is the creation time (8 digits) and 6 random bytes. Fails the test (never
    skips it) when PostgreSQL does not answer.
    """
    name = f"{TEST_DATABASE_PREFIX}{int(time.time()):08x}{secrets.token_hex(6)}"
    try:
        run_in_thread(_admin(f'CREATE DATABASE "{name}"'))
    except StoreError as exc:
        problem = str(exc)
    else:
        return dsn_for(name)
    pytest.fail(
        f"PostgreSQL is not usable at {admin_dsn()}: {problem}. The store tests run on "
        f"PostgreSQL too and never skip it: start one (CI does), or point "
        f"{PG_DSN_VARIABLE} at a server where this user may create databases.",
        pytrace=False,
    )


def drop_database(dsn: str) -> None:
    """Drop the database of ``dsn``, disconnecting whoever is still on it."""
    name = urlsplit(dsn).path.lstrip("/")
    run_in_thread(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _migrate(dsn: str) -> None:
    store = PostgresStore(dsn)
    await store.connect()
    try:
        await store.migrate()
    finally:
        await store.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """Yield the DSN of a database made and migrated once for this test session."""
    dsn = create_database()
    try:
        run_in_thread(_migrate(dsn))
        yield dsn
    finally:
        drop_database(dsn)


@pytest.fixture
def fresh_pg_dsn() -> Iterator[str]:
    """Yield the DSN of a new, empty (not migrated) database, dropped after the test."""
    dsn = create_database()
    try:
        yield dsn
    finally:
        drop_database(dsn)


async def truncate(store: PostgresStore) -> None:
    """Empty every table but ``schema_migrations`` and restart the serial ids.

    Only tables holding rows are truncated (each costs a file swap and an fsync, ~15 ms),
    and the identities of the others are reset, which is the same end state.
    """
    async with store._transaction() as conn:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_catalog.pg_tables "
            "WHERE schemaname = current_schema() AND tablename <> 'schema_migrations'"
        )
        tables = [str(row["tablename"]) for row in rows]
        if not tables:
            return
        probe = " UNION ALL ".join(
            f"SELECT '{t}' AS name WHERE EXISTS (SELECT 1 FROM \"{t}\")" for t in tables
        )
        filled = [str(row["name"]) for row in await conn.fetch(probe)]
        if filled:
            names = ", ".join(f'"{t}"' for t in filled)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        await conn.fetch(
            "SELECT setval(c.oid::regclass, 1, false) FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'S' AND n.nspname = current_schema()"
        )


async def open_sqlite_store(path: Path) -> SqliteStore:
    """Return a connected, migrated SQLite store on a new file."""
    store = SqliteStore(path)
    await store.connect()
    try:
        await store.migrate()
    except BaseException:
        await store.close()
        raise
    return store


@pytest.fixture(params=STORE_DRIVERS)
def store_driver(request: pytest.FixtureRequest) -> str:
    """The driver name the ``store`` fixture builds (one run per driver)."""
    return str(request.param)


@pytest.fixture
def store_location(store_driver: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the ``store`` fixture's database is: a file path or a DSN."""
    if store_driver == "sqlite":
        return str(tmp_path / "home" / "streamspace.db")
    return str(request.getfixturevalue("pg_database"))


@pytest_asyncio.fixture
async def store(store_driver: str, store_location: str) -> AsyncIterator[Store]:
    """Yield a connected, migrated and empty store, once per driver; closed afterwards."""
    built: SqliteStore | PostgresStore
    if store_driver == "sqlite":
        built = await open_sqlite_store(Path(store_location))
    else:
        built = PostgresStore(store_location)
        await built.connect()
        try:
            await truncate(built)
        except BaseException:
            await built.close()
            raise
    try:
        yield built
    finally:
        await built.close()


@pytest_asyncio.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """Yield a connected, migrated SQLite store on a new file; closed afterwards."""
    built = await open_sqlite_store(tmp_path / "home" / "streamspace.db")
    try:
        yield built
    finally:
        await built.close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine's environment out of every test (see ``apikit.isolate``)."""
    isolate(monkeypatch)


@pytest_asyncio.fixture
async def harness(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    """A served control plane on ``store`` with fast intervals, and its simulated agents."""
    async with serve_control_plane(fast_settings(tmp_path), store) as h:
        yield h


REDIS_URL = "redis://127.0.0.1:6379/0"
"""The machine's Redis, which the hub, replica and outage tests share under prefixes."""


@pytest_asyncio.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    made = f"test-{secrets.token_hex(4)}:"
    try:
        yield made
    finally:
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        keys = [k async for k in client.scan_iter(match=f"{made}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
