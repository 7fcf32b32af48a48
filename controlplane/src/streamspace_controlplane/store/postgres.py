"""The ``postgres`` store: PostgreSQL through an asyncpg pool, for several replicas.

Every decision between concurrent writers is one statement or one transaction (see
:mod:`~streamspace_controlplane.store.base`), so replicas sharing the database need no
other coordination. ``migrate()`` holds a session advisory lock for its whole run, so
replicas starting together apply each migration once.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store._sql import Dialect, SqlConnection, SqlStore
from streamspace_controlplane.store.base import Conflict, NotFound, StoreError

__all__ = ["MIGRATION_LOCK_KEY", "PostgresStore"]

MIGRATION_LOCK_KEY = 0x5354_5245_414D_5350
"""``pg_advisory_lock`` key held by ``migrate()`` ("STREAMSP" in ASCII, a fixed bigint)."""

_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
)
"""Connection failures worth retrying: the server is starting, full or not up yet."""

_MIGRATION_TIMEOUT_S = 3600.0
"""Bound on each statement of ``migrate()``, instead of ``DATABASE_TIMEOUT``: a migration
may rewrite a big table, or wait for another replica's migration to finish."""

_DEFAULT_TIMEOUT_S: float = ControlPlaneSettings.model_fields["database_timeout"].default
"""``DATABASE_TIMEOUT``'s default, for a store built from a DSN alone."""

_PLACEHOLDER = re.compile(r"\?")


@lru_cache(maxsize=512)
def _numbered(sql: str) -> str:
    """Rewrite ``?`` placeholders as asyncpg's ``$1, $2, ...`` (no query has a literal ``?``)."""
    counter = iter(range(1, 1 << 16))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PostgresDialect(Dialect):
    name = "postgres"
    table_exists_sql = (
        "SELECT COUNT(*) FROM pg_catalog.pg_tables "
        "WHERE schemaname = current_schema() AND tablename = ?"
    )

    # The connection's JSONB codec (json.dumps/json.loads) does the work.
    def dump_json(self, value: object) -> object:
        return value

    def load_json(self, value: object) -> object:
        return value

    def dump_time(self, value: datetime) -> object:
        return value

    def load_time(self, value: object) -> datetime:
        if not isinstance(value, datetime):  # pragma: no cover - TIMESTAMPTZ is a datetime
            raise StoreError(f"expected a timestamp from PostgreSQL, got {value!r}")
        return value.astimezone(UTC)


def _translate(exc: BaseException) -> StoreError:
    """Turn an asyncpg (or socket) exception into the store's own."""
    if isinstance(exc, TimeoutError):
        return StoreError("postgres: no answer within DATABASE_TIMEOUT")
    detail = getattr(exc, "detail", None)
    message = f"postgres: {exc}" + (f" ({detail})" if detail else "")
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict(message)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound(message)
    return StoreError(message)


_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
)


class _PostgresConnection(SqlConnection):
    """A pooled connection; each statement is bounded by ``timeout_s`` (``None``: the
    pool's ``command_timeout``)."""

    def __init__(
        self, conn: asyncpg.pool.PoolConnectionProxy[Any], timeout_s: float | None = None
    ) -> None:
        self._conn = conn
        self._timeout_s = timeout_s
        self.dropped: StoreError | None = None
        """The timeout that made it drop the connection, if one did."""

    def failure(self, exc: BaseException) -> StoreError:
        """Translate ``exc``; on a timeout, drop the connection first.

        Dropped, not cancelled as asyncpg would: a server that stopped answering would not
        answer the cancel request either (the request would wait for it as long again),
        and the connection cannot be trusted afterwards. Its transaction rolls back with it.
        """
        error = _translate(exc)
        if isinstance(exc, TimeoutError) and self.dropped is None:
            self.dropped = error
            self._conn.terminate()
        return error

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            status: str = await self._conn.execute(_numbered(sql), *args, timeout=self._timeout_s)
        except _ERRORS as exc:
            raise self.failure(exc) from exc
        count = status.rsplit(" ", 1)[-1]  # "UPDATE 1", "INSERT 0 1", "DELETE 0"
        return int(count) if count.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        try:
            rows = await self._conn.fetch(_numbered(sql), *args, timeout=self._timeout_s)
        except _ERRORS as exc:
            raise self.failure(exc) from exc
        return [dict(row.items()) for row in rows]

    async def run_script(self, script: str) -> None:
        try:
            # No arguments: the simple protocol runs every statement.
            await self._conn.execute(script, timeout=self._timeout_s)
        except _ERRORS as exc:
            raise self.failure(exc) from exc


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    """Make JSON and JSONB columns arrive as Python values and accept them as parameters."""
    for pg_type in ("json", "jsonb"):
        await conn.set_type_codec(
            pg_type, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


def _describe(dsn: str) -> str:
    """Return ``host HOST port PORT database DB`` from a DSN, leaving out any password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        database = unquote(parts.path.lstrip("/")) or parts.username or "postgres"
    except ValueError:
        return "the configured database (unparsable DSN)"
    return f"host {host} port {port} database {database!r}"


class PostgresStore(SqlStore):
    """The store in PostgreSQL, shared by every control-plane replica.

    Args:
        dsn: ``postgresql://user:password@host:port/db``; default built from ``settings``.
        settings: the control plane's settings (``DB_HOST``, ``DB_PORT``, ``DB_NAME``,
            ``DB_USER``, ``DB_PASSWORD``), read from the environment when neither is given.
        min_size: connections the pool keeps open.
        max_size: connections the pool opens at most; ten serve one replica's API, hub and
            loops without crowding a small server's ``max_connections``.
        connect_timeout_s: how long ``connect()`` keeps retrying a server that is not up yet
            (a database starting beside the control plane, as in docker compose).
        close_timeout_s: how long ``close()`` waits for borrowed connections.
        timeout_s: how long one statement, or the wait for a connection from the pool, may
            take before it fails with :class:`StoreError` (so a database that stopped
            answering never holds a request forever); default ``DATABASE_TIMEOUT`` from
            ``settings``, or its default of 10 s.
    """

    name = "postgres"
    dialect = _PostgresDialect()

    def __init__(
        self,
        dsn: str | None = None,
        *,
        settings: ControlPlaneSettings | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout_s: float = 10.0,
        close_timeout_s: float = 10.0,
        timeout_s: float | None = None,
    ) -> None:
        if dsn is None and settings is None:
            settings = ControlPlaneSettings()
        if dsn is None:
            assert settings is not None
            dsn = settings.postgres_dsn()
        if timeout_s is None:
            timeout_s = _DEFAULT_TIMEOUT_S if settings is None else settings.database_timeout
        self._dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.timeout_s = timeout_s
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({_describe(self._dsn)})"

    # -- lifecycle --------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool, retrying for ``connect_timeout_s`` while the server is not up.

        Raises:
            StoreError: naming the host, port and database, when it cannot connect (or
                refuses the credentials, or the database does not exist).
        """
        if self._pool is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        delay = 0.1
        attempts = 0
        while True:
            attempts += 1
            remaining = deadline - loop.time()
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    init=_init_connection,
                    timeout=max(min(remaining, 5.0), 0.5),
                    command_timeout=self.timeout_s,
                )
                return
            except _TRANSIENT as exc:
                if loop.time() + delay >= deadline:
                    raise StoreError(
                        f"cannot connect to PostgreSQL at {_describe(self._dsn)} "
                        f"({attempts} attempts in {self.connect_timeout_s:g}s): {exc}"
                    ) from exc
            except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
                raise StoreError(
                    f"cannot connect to PostgreSQL at {_describe(self._dsn)}: {exc}"
                ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def close(self) -> None:
        """Close the pool; safe to call twice.

        Waits up to ``close_timeout_s`` for borrowed connections to come back, then cuts
        them, so a shutdown never hangs on a stuck query.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.close_timeout_s)
        except TimeoutError:
            pool.terminate()

    # -- connections ------------------------------------------------------------------

    def _require(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreError(f"{self!r} is not connected; call connect() first")
        return self._pool

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[Any]]:
        try:
            # The timeout also bounds the reset when the connection goes back.
            async with self._require().acquire(timeout=self.timeout_s) as conn:
                yield conn
        except _ERRORS as exc:  # acquiring, or resetting on release
            raise _translate(exc) from exc

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[SqlConnection]:
        async with self._acquire() as conn:
            yield _PostgresConnection(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[SqlConnection]:
        async with self._acquire() as conn:
            wrapped = _PostgresConnection(conn)
            try:
                async with conn.transaction():  # rolls back when the block raises
                    yield wrapped
            except _ERRORS as exc:  # begin, commit, or the rollback of a dropped connection
                raise wrapped.dropped or wrapped.failure(exc) from exc

    @asynccontextmanager
    async def _migration_transaction(self) -> AsyncIterator[SqlConnection]:
        async with self._acquire() as conn:
            wrapped = _PostgresConnection(conn, timeout_s=_MIGRATION_TIMEOUT_S)
            await wrapped.execute("SELECT pg_advisory_lock(?)", MIGRATION_LOCK_KEY)
            try:
                async with conn.transaction():
                    yield wrapped
            except _ERRORS as exc:  # begin, commit, or the rollback of a dropped connection
                raise wrapped.dropped or wrapped.failure(exc) from exc
            finally:
                # If this fails the connection is broken, and the server drops the lock with
                # it; asyncpg's reset on release (pg_advisory_unlock_all) covers the rest.
                with suppress(StoreError):
                    await wrapped.execute("SELECT pg_advisory_unlock(?)", MIGRATION_LOCK_KEY)
