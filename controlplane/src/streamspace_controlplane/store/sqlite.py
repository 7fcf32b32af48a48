"""The ``sqlite`` store: the embedded default, one file under ``STREAMSPACE_HOME``.

One aiosqlite connection serves the process; an :class:`asyncio.Lock` gives it to one
coroutine at a time, so transactions never interleave. WAL mode lets readers in other
processes (``streamspace-controlplane`` CLI commands) work while the server writes, and
``busy_timeout`` makes a second writer wait instead of failing. Every write transaction
starts with ``BEGIN IMMEDIATE``, taking the write lock up front, which is also what makes
``migrate()`` safe when several processes open a fresh file at once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store._sql import Dialect, SqlConnection, SqlStore
from streamspace_controlplane.store.base import Conflict, NotFound, StoreError

__all__ = ["SqliteStore"]

_MIN_VERSION = (3, 35, 0)
"""``RETURNING`` arrived in SQLite 3.35."""


class _SqliteDialect(Dialect):
    name = "sqlite"
    table_exists_sql = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?"

    def dump_json(self, value: object) -> object:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def load_json(self, value: object) -> object:
        return json.loads(str(value))

    def dump_time(self, value: datetime) -> object:
        # Fixed width with microseconds and +00:00, so text order is time order.
        return value.astimezone(UTC).isoformat(timespec="microseconds")

    def load_time(self, value: object) -> datetime:
        parsed = datetime.fromisoformat(str(value))
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)


def _translate(exc: Exception, where: str) -> StoreError:
    """Turn an sqlite3/aiosqlite exception into the store's own."""
    message = f"sqlite {where}: {exc}"
    if isinstance(exc, sqlite3.IntegrityError):
        text = str(exc)
        if text.startswith("UNIQUE constraint failed"):
            return Conflict(message)
        if text.startswith("FOREIGN KEY constraint failed"):
            return NotFound(message)
    return StoreError(message)


def _statements(script: str) -> list[str]:
    """Split a script into statements (``executescript`` would commit our transaction)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        not ln.strip() or ln.strip().startswith("--") for ln in pending.splitlines()
    ):
        raise StoreError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return statements


class _SqliteConnection(SqlConnection):
    def __init__(self, conn: aiosqlite.Connection, where: str) -> None:
        self._conn = conn
        self._where = where

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            async with self._conn.execute(sql, args) as cursor:
                return cursor.rowcount
        except (sqlite3.Error, ValueError) as exc:
            raise _translate(exc, self._where) from exc

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        try:
            rows = await self._conn.execute_fetchall(sql, args)
        except (sqlite3.Error, ValueError) as exc:
            raise _translate(exc, self._where) from exc
        return [dict(zip(row.keys(), tuple(row), strict=True)) for row in rows]

    async def run_script(self, script: str) -> None:
        for statement in _statements(script):
            await self.execute(statement)


class SqliteStore(SqlStore):
    """The store in one SQLite file (default ``$STREAMSPACE_HOME/streamspace.db``).

    Args:
        path: the database file, or ``":memory:"``; default from ``settings``.
        settings: the control plane's settings, read for ``sqlite_path`` when ``path`` is
            not given (and from the environment when neither is).
        busy_timeout_s: how long a write waits for another process's write lock.
    """

    name = "sqlite"
    dialect = _SqliteDialect()

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        settings: ControlPlaneSettings | None = None,
        busy_timeout_s: float = 5.0,
    ) -> None:
        if path is None:
            path = (settings if settings is not None else ControlPlaneSettings()).sqlite_path
        self.path = path if path == ":memory:" else Path(path).expanduser()
        self.busy_timeout_s = busy_timeout_s
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    # -- lifecycle --------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the file (creating its folder, mode 0700, and the file, mode 0600).

        Raises:
            StoreError: the file cannot be opened, or SQLite is older than 3.35.
        """
        if self._conn is not None:
            return
        self._lock = asyncio.Lock()  # bound to the running loop on first use
        if sqlite3.sqlite_version_info < _MIN_VERSION:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; the store needs 3.35 or later"
            )
        if isinstance(self.path, Path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.path.touch(mode=0o600, exist_ok=True)  # it holds password hashes
            except OSError as exc:
                raise StoreError(f"cannot create the SQLite database {self.path}: {exc}") from exc
        try:
            conn = await aiosqlite.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise _translate(exc, f"{self.path}") from exc
        conn.row_factory = sqlite3.Row
        try:
            wrapped = _SqliteConnection(conn, str(self.path))
            await wrapped.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            await wrapped.execute("PRAGMA foreign_keys = ON")
            await wrapped.fetch("PRAGMA journal_mode = WAL")
            await wrapped.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await conn.close()

    # -- connections ------------------------------------------------------------------

    def _require(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"{self!r} is not connected; call connect() first")
        return self._conn

    async def _idle(self) -> _SqliteConnection:
        """Return the connection, outside any transaction (the lock must be held)."""
        conn = self._require()
        if conn.in_transaction:  # a cancelled caller left it open
            await self._rollback(conn)
        return _SqliteConnection(conn, str(self.path))

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[SqlConnection]:
        async with self._lock:
            yield await self._idle()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[SqlConnection]:
        async with self._lock:
            wrapped = await self._idle()
            conn = self._require()
            await wrapped.execute("BEGIN IMMEDIATE")
            try:
                yield wrapped
                await wrapped.execute("COMMIT")
            except BaseException:
                await self._rollback(conn)
                raise

    def _migration_transaction(self) -> AbstractAsyncContextManager[SqlConnection]:
        # BEGIN IMMEDIATE already excludes every other writer of the file.
        return self._transaction()

    @staticmethod
    async def _rollback(conn: aiosqlite.Connection) -> None:
        with suppress(sqlite3.Error, ValueError):
            await conn.rollback()
