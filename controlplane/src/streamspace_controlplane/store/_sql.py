"""One SQL implementation of the store, shared by the ``sqlite`` and ``postgres`` drivers.

:class:`SqlStore` holds every query, written once in the subset of SQL both databases speak
(``ON CONFLICT``, ``RETURNING``, ``LIMIT``/``OFFSET``) with ``?`` placeholders. A driver
brings the rest: a :class:`Dialect` (how JSON and timestamps are stored), a
:class:`SqlConnection` over its client library (placeholders, rows as dicts, its exceptions
turned into :class:`StoreError`), the transaction primitive, and the lock that makes
``migrate()`` safe when several processes run it at once.

Columns are named after the model fields, so rows parse straight into the records of
:mod:`streamspace_controlplane.models`; which columns hold JSON or timestamps is read from
the fields' types.
"""

from __future__ import annotations

import re
import types
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from importlib import resources
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, Union, cast, get_args
from typing import get_origin as _origin

from pydantic import AwareDatetime, BaseModel, TypeAdapter
from pydantic_core import to_jsonable_python

from streamspace_controlplane.models import (
    AgentRecord,
    AgentToken,
    AuditEntry,
    CommandRecord,
    Role,
    Session,
    SessionEventRecord,
    Template,
    User,
    utcnow,
)
from streamspace_controlplane.store.base import (
    Conflict,
    LastAdmin,
    NotFound,
    StaleEpoch,
    Store,
    StoreError,
)
from streamspace_sdk.platform import Usage

__all__ = ["TABLES", "Dialect", "Migration", "SqlConnection", "SqlStore", "load_migrations"]

R = TypeVar("R", bound=BaseModel)

_OPEN_STATUSES = ("pending", "sent", "acked")
"""Command statuses that are not final."""
_FINAL_STATUSES = frozenset({"completed", "failed", "expired"})
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


# -- the driver's side -------------------------------------------------------------------


class Dialect(ABC):
    """How one database stores what SQL does not spell the same everywhere."""

    name: ClassVar[str]
    """Folder of its migrations under ``store/migrations``."""
    table_exists_sql: ClassVar[str]
    """A query with one ``?`` (a table name) returning a count, 0 when there is no table."""

    @abstractmethod
    def dump_json(self, value: object) -> object:
        """Return the parameter for a JSON column from a JSON-able Python value."""

    @abstractmethod
    def load_json(self, value: object) -> object:
        """Return the Python value of a JSON column as the driver hands it over."""

    @abstractmethod
    def dump_time(self, value: datetime) -> object:
        """Return the parameter for a timestamp column from an aware UTC datetime."""

    @abstractmethod
    def load_time(self, value: object) -> datetime:
        """Return an aware UTC datetime from a timestamp column as the driver hands it over."""


class SqlConnection(ABC):
    """One database connection as the shared queries use it.

    Statements use ``?`` placeholders; the driver rewrites them if its library wants
    another style. Every driver exception comes out as a :class:`StoreError`: a unique
    violation as :class:`Conflict`, a missing referenced row as :class:`NotFound`.
    """

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; return the number of rows it changed."""

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Run one statement; return its rows as dicts keyed by column name."""

    @abstractmethod
    async def run_script(self, script: str) -> None:
        """Run several ``;``-separated statements (a migration file)."""

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        """Run one statement; return its first row or ``None``."""
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> object:
        """Run one statement; return the first column of its first row (``None`` if none)."""
        row = await self.fetchrow(sql, *args)
        return None if row is None else next(iter(row.values()))


# -- migrations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One numbered migration file, ``NNNN_name.sql``."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """Return the migrations shipped for ``dialect``, in version order.

    Raises:
        StoreError: a file is misnamed or two files share a version.
    """
    folder = resources.files("streamspace_controlplane.store").joinpath("migrations", dialect)
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            raise StoreError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise StoreError(f"two {dialect} migrations have version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


# -- tables ------------------------------------------------------------------------------

_Kind = Literal["json", "time", "plain"]


def _kind(annotation: object) -> _Kind:
    """Classify a model field: JSON column, timestamp column, or a plain scalar."""
    args = get_args(annotation)
    if _origin(annotation) in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _kind(options[0])
        return "json"  # e.g. str | list[str]: JSON keeps the type of the value
    origin = _origin(annotation) or annotation
    if origin is AwareDatetime or (isinstance(origin, type) and issubclass(origin, datetime)):
        return "time"
    if isinstance(origin, type) and issubclass(origin, dict | list | BaseModel):
        return "json"
    return "plain"


def _quote(column: str) -> str:
    # Quoted because some field names are reserved words in PostgreSQL ("user").
    return f'"{column}"'


def _marks(count: int) -> str:
    return ", ".join("?" * count)


@dataclass(frozen=True)
class _Table(Generic[R]):
    """A table whose columns are the fields of ``model`` (and maybe a few more)."""

    name: str
    model: type[R]
    generated: frozenset[str] = field(default_factory=frozenset)
    """Columns the database fills in on insert (serial ids)."""

    @cached_property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.model.model_fields)

    @cached_property
    def kinds(self) -> dict[str, _Kind]:
        return {n: _kind(f.annotation) for n, f in self.model.model_fields.items()}

    @cached_property
    def column_list(self) -> str:
        return ", ".join(_quote(c) for c in self.columns)

    @cached_property
    def select(self) -> str:
        return f"SELECT {self.column_list} FROM {self.name}"

    @cached_property
    def insert_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c not in self.generated)

    @cached_property
    def insert(self) -> str:
        cols = self.insert_columns
        return (
            f"INSERT INTO {self.name} ({', '.join(_quote(c) for c in cols)}) "
            f"VALUES ({_marks(len(cols))})"
        )


_USERS = _Table("users", User)
_TOKENS = _Table("agent_tokens", AgentToken)
_AGENTS = _Table("agents", AgentRecord)
_TEMPLATES = _Table("templates", Template)
_SESSIONS = _Table("sessions", Session)
_COMMANDS = _Table("agent_commands", CommandRecord)
_EVENTS = _Table("session_events", SessionEventRecord, generated=frozenset({"id"}))
_AUDIT = _Table("audit_log", AuditEntry, generated=frozenset({"id"}))
TABLES: tuple[_Table[Any], ...] = (
    _USERS,
    _TOKENS,
    _AGENTS,
    _TEMPLATES,
    _SESSIONS,
    _COMMANDS,
    _EVENTS,
    _AUDIT,
)
"""Every table the store reads, with the model whose fields are its columns."""


def _adapter(name: str) -> TypeAdapter[Any]:
    info = Session.model_fields[name]
    annotation: Any = info.annotation
    if info.metadata:
        annotation = cast("Any", Annotated)[(annotation, *info.metadata)]
    return TypeAdapter(annotation)


_SESSION_FIELDS: dict[str, TypeAdapter[Any]] = {
    name: _adapter(name) for name in Session.model_fields if name != "id"
}
"""Validators of the fields ``update_session`` may set (the id never changes)."""


def _aware(value: datetime) -> datetime:
    """Return ``value`` in UTC; refuse naive datetimes, whose zone would be a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: the store needs aware UTC times")
    return value.astimezone(UTC)


def _int(value: object) -> int:
    """Return a count or number the database handed over as an int (``NULL`` is 0)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    raise StoreError(f"expected an integer from the database, got {value!r}")


def _in(values: Sequence[str]) -> str:
    return f"({_marks(len(values))})"


# -- the shared implementation -----------------------------------------------------------


class SqlStore(Store):
    """Every :class:`Store` method as SQL; subclasses supply connections and a dialect.

    Subclasses implement ``connect``, ``close``, :meth:`_connection` (a connection in
    autocommit mode, for single statements), :meth:`_transaction` (a connection inside a
    transaction, committed when the block ends, rolled back on an exception), and
    :meth:`_migration_transaction` (a transaction that also excludes every other process
    migrating the same database).
    """

    dialect: ClassVar[Dialect]

    @abstractmethod
    def _connection(self) -> AbstractAsyncContextManager[SqlConnection]:
        """Lend a connection in autocommit mode, for statements atomic on their own."""

    @abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[SqlConnection]:
        """Lend a connection inside a transaction; no other transaction interleaves."""

    @abstractmethod
    def _migration_transaction(self) -> AbstractAsyncContextManager[SqlConnection]:
        """Like :meth:`_transaction`, also exclusive across processes for ``migrate()``."""

    # -- encoding ---------------------------------------------------------------------

    def _dump(self, kind: _Kind, value: object) -> object:
        if value is None:
            return None
        if kind == "json":
            return self.dialect.dump_json(to_jsonable_python(value))
        if kind == "time":
            if not isinstance(value, datetime):
                raise TypeError(f"expected a datetime, got {value!r}")
            return self.dialect.dump_time(_aware(value))
        return value

    def _time(self, value: datetime) -> object:
        return self.dialect.dump_time(_aware(value))

    def _values(self, table: _Table[Any], record: BaseModel) -> list[object]:
        # getattr, not model_dump: hashes are excluded from serialisation but are columns.
        kinds = table.kinds
        return [self._dump(kinds[c], getattr(record, c)) for c in table.insert_columns]

    def _load(self, table: _Table[R], row: Mapping[str, Any]) -> R:
        values: dict[str, Any] = {}
        for column in table.columns:
            value = row[column]
            kind = table.kinds[column]
            if value is not None and kind == "json":
                value = self.dialect.load_json(value)
            elif value is not None and kind == "time":
                value = self.dialect.load_time(value)
            values[column] = value
        return table.model.model_validate(values)

    def _load_all(self, table: _Table[R], rows: Iterable[Mapping[str, Any]]) -> list[R]:
        return [self._load(table, row) for row in rows]

    async def _fetch(self, table: _Table[R], sql: str, *args: Any) -> list[R]:
        async with self._connection() as conn:
            return self._load_all(table, await conn.fetch(sql, *args))

    async def _fetch_one(self, table: _Table[R], sql: str, *args: Any) -> R | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(sql, *args)
        return None if row is None else self._load(table, row)

    # A single statement is atomic on its own, so one-statement writes skip BEGIN/COMMIT.

    async def _write(self, sql: str, *args: Any) -> int:
        async with self._connection() as conn:
            return await conn.execute(sql, *args)

    async def _write_returning(self, table: _Table[R], sql: str, *args: Any) -> R | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{sql} RETURNING {table.column_list}", *args)
        return None if row is None else self._load(table, row)

    async def _insert(self, table: _Table[R], record: R, taken: str) -> R:
        try:
            row = await self._write_returning(table, table.insert, *self._values(table, record))
        except Conflict as exc:
            raise Conflict(taken) from exc
        if row is None:  # pragma: no cover - an INSERT without ON CONFLICT returns its row
            raise StoreError(f"insert into {table.name} returned no row")
        return row

    # -- lifecycle --------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply pending migrations in one transaction, recording each in ``schema_migrations``.

        The driver's migration lock makes concurrent callers wait; the late ones find the
        versions recorded and apply nothing.
        """
        migrations = load_migrations(self.dialect.name)
        applied: list[int] = []
        async with self._migration_transaction() as conn:
            await conn.execute(self._schema_migrations_ddl())
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations:
                if migration.version in done:
                    continue
                try:
                    await conn.run_script(migration.sql)
                except StoreError as exc:
                    raise StoreError(
                        f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                    ) from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    migration.version,
                    migration.name,
                    self._time(utcnow()),
                )
                applied.append(migration.version)
        return applied

    def _schema_migrations_ddl(self) -> str:
        time_type = "TIMESTAMPTZ" if self.dialect.name == "postgres" else "TEXT"
        return (
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            f"applied_at {time_type} NOT NULL)"
        )

    async def schema_version(self) -> int:
        """Return the highest applied migration, 0 before the first ``migrate()``."""
        async with self._connection() as conn:
            if not await conn.fetchval(self.dialect.table_exists_sql, "schema_migrations"):
                return 0
            version = await conn.fetchval("SELECT MAX(version) FROM schema_migrations")
        return _int(version)

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless ``SELECT 1`` answers."""
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    # -- users ------------------------------------------------------------------------

    async def create_user(self, user: User, password_hash: str) -> User:
        """Insert a user with its hash; ``Conflict`` if the name is taken."""
        stored = user.model_copy(update={"password_hash": password_hash})
        created = await self._insert(_USERS, stored, f"user {user.username!r} already exists")
        return created.model_copy(update={"password_hash": ""})

    async def get_user(self, username: str) -> User | None:
        """Return the user with ``password_hash`` filled in, or ``None``."""
        return await self._fetch_one(_USERS, f"{_USERS.select} WHERE username = ?", username)

    async def list_users(self) -> list[User]:
        """Return every user by name, without password hashes."""
        users = await self._fetch(_USERS, f"{_USERS.select} ORDER BY username")
        return [u.model_copy(update={"password_hash": ""}) for u in users]

    async def delete_user(self, username: str) -> bool:
        """Delete a user; return whether one was deleted."""
        return await self._write("DELETE FROM users WHERE username = ?", username) > 0

    async def set_password(self, username: str, password_hash: str) -> bool:
        """Replace a user's password hash and cut off their tokens; return whether the
        user exists."""
        sql = "UPDATE users SET password_hash = ?, token_epoch = token_epoch + 1 WHERE username = ?"
        return await self._write(sql, password_hash, username) > 0

    async def update_user(
        self,
        username: str,
        *,
        role: Role | None = None,
        disabled: bool | None = None,
        revoke_tokens: bool = False,
    ) -> User | None:
        """Set a user's role and disabled flag, maybe cut off their tokens;
        :class:`LastAdmin` if no enabled admin would remain. See :meth:`Store.update_user`."""
        # The user and every admin are read and locked in one order (by name), so two
        # admins changing each other wait for one another instead of deadlocking, and the
        # second sees the first's change. SQLite's BEGIN IMMEDIATE already serialises.
        lock = " FOR UPDATE" if self.dialect.name == "postgres" else ""
        async with self._transaction() as conn:
            rows = await conn.fetch(
                f"{_USERS.select} WHERE role = 'admin' OR username = ? ORDER BY username{lock}",
                username,
            )
            found = {u.username: u for u in self._load_all(_USERS, rows)}
            user = found.get(username)
            if user is None:
                return None
            new_role = user.role if role is None else role
            new_disabled = user.disabled if disabled is None else disabled
            enabled = {n for n, u in found.items() if u.role == "admin" and not u.disabled}
            leaves = username in enabled and (new_role != "admin" or new_disabled)
            if leaves and not enabled - {username}:
                raise LastAdmin(username)
            row = await conn.fetchrow(
                "UPDATE users SET role = ?, disabled = ?, token_epoch = token_epoch + ? "
                f"WHERE username = ? RETURNING {_USERS.column_list}",
                new_role,
                new_disabled,
                1 if revoke_tokens else 0,
                username,
            )
        if row is None:  # pragma: no cover - the row is locked and exists
            return None
        return self._load(_USERS, row).model_copy(update={"password_hash": ""})

    # -- agent tokens -----------------------------------------------------------------

    async def create_agent_token(self, token: AgentToken) -> AgentToken:
        """Insert a token; ``Conflict`` if its id (or hash) is taken."""
        return await self._insert(_TOKENS, token, f"agent token {token.token_id!r} already exists")

    async def find_agent_token(self, token_hash: str) -> AgentToken | None:
        """Return the token with this hash, revoked or not."""
        return await self._fetch_one(_TOKENS, f"{_TOKENS.select} WHERE token_hash = ?", token_hash)

    async def list_agent_tokens(self, agent_id: str | None = None) -> list[AgentToken]:
        """Return tokens newest first, optionally of one agent."""
        order = "ORDER BY created_at DESC, token_id DESC"
        if agent_id is None:
            return await self._fetch(_TOKENS, f"{_TOKENS.select} {order}")
        return await self._fetch(_TOKENS, f"{_TOKENS.select} WHERE agent_id = ? {order}", agent_id)

    async def revoke_agent_token(self, token_id: str, at: datetime) -> bool:
        """Set ``revoked_at`` once; return whether this call revoked it."""
        sql = "UPDATE agent_tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL"
        return await self._write(sql, self._time(at), token_id) > 0

    async def touch_agent_token(self, token_id: str, at: datetime) -> None:
        """Set ``last_used_at``."""
        sql = "UPDATE agent_tokens SET last_used_at = ? WHERE token_id = ?"
        await self._write(sql, self._time(at), token_id)

    # -- agents -----------------------------------------------------------------------

    async def register_agent(self, agent: AgentRecord) -> AgentRecord:
        """Upsert the agent as ``online``; one statement, guarded by the fencing epoch.

        The update only happens when the stored epoch is not above the new one, so two
        leaders racing cannot both win, and a deposed one never overwrites the newer.
        ``created_at`` keeps its first value; ``last_heartbeat`` defaults to now.
        """
        record = agent.model_copy(
            update={"status": "online", "last_heartbeat": agent.last_heartbeat or utcnow()}
        )
        columns = [*_AGENTS.insert_columns, "updated_at"]
        refreshed = [c for c in _AGENTS.insert_columns if c not in ("agent_id", "created_at")]
        sql = (
            f"INSERT INTO agents ({', '.join(_quote(c) for c in columns)}) "
            f"VALUES ({_marks(len(columns))}) "
            "ON CONFLICT (agent_id) DO UPDATE SET "
            + ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in [*refreshed, "updated_at"])
            + " WHERE agents.fencing_epoch <= excluded.fencing_epoch"
            f" RETURNING {_AGENTS.column_list}"
        )
        values = [*self._values(_AGENTS, record), self._time(utcnow())]
        async with self._transaction() as conn:
            row = await conn.fetchrow(sql, *values)
            if row is None:
                highest = await conn.fetchval(
                    "SELECT fencing_epoch FROM agents WHERE agent_id = ?", agent.agent_id
                )
                raise StaleEpoch(agent.agent_id, agent.fencing_epoch, _int(highest))
        return self._load(_AGENTS, row)

    async def heartbeat_agent(
        self, agent_id: str, conn_id: str, usage: dict[str, Any], at: datetime
    ) -> bool:
        """Store usage and ``last_heartbeat`` if ``conn_id`` is the online agent's connection.

        An agent marked offline (e.g. by the heartbeat timeout) gets ``False`` too, so its
        socket is closed and it registers again.
        """
        sql = (
            "UPDATE agents SET usage = ?, last_heartbeat = ?, updated_at = ? "
            "WHERE agent_id = ? AND websocket_conn_id = ? AND status = 'online'"
        )
        values = (
            self._dump("json", Usage.model_validate(usage)),
            self._time(at),
            self._time(utcnow()),
            agent_id,
            conn_id,
        )
        return await self._write(sql, *values) > 0

    async def set_agent_offline(self, agent_id: str, conn_id: str | None = None) -> bool:
        """Mark the agent offline, only if ``conn_id`` (when given) is still its connection.

        ``websocket_conn_id`` is kept: it names the connection that registered last.
        """
        sql = "UPDATE agents SET status = 'offline', updated_at = ? WHERE agent_id = ?"
        args: list[Any] = [self._time(utcnow()), agent_id]
        if conn_id is not None:
            sql += " AND websocket_conn_id = ?"
            args.append(conn_id)
        return await self._write(sql, *args) > 0

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        """Return one agent."""
        return await self._fetch_one(_AGENTS, f"{_AGENTS.select} WHERE agent_id = ?", agent_id)

    async def list_agents(self, status: str | None = None) -> list[AgentRecord]:
        """Return agents by id, optionally only those with ``status``."""
        if status is None:
            return await self._fetch(_AGENTS, f"{_AGENTS.select} ORDER BY agent_id")
        sql = f"{_AGENTS.select} WHERE status = ? ORDER BY agent_id"
        return await self._fetch(_AGENTS, sql, status)

    async def delete_agent(self, agent_id: str) -> bool:
        """Forget an agent (its sessions and commands keep its id)."""
        return await self._write("DELETE FROM agents WHERE agent_id = ?", agent_id) > 0

    # -- templates --------------------------------------------------------------------

    async def create_template(self, template: Template) -> Template:
        """Insert; ``Conflict`` if the name is taken."""
        taken = f"template {template.name!r} already exists"
        return await self._insert(_TEMPLATES, template, taken)

    async def update_template(self, template: Template) -> Template:
        """Replace by name, keeping ``created_at`` and setting ``updated_at`` to now."""
        record = template.model_copy(update={"updated_at": utcnow()})
        columns = [c for c in _TEMPLATES.columns if c not in ("name", "created_at")]
        sets = ", ".join(f"{_quote(c)} = ?" for c in columns)
        kinds = _TEMPLATES.kinds
        values = [self._dump(kinds[c], getattr(record, c)) for c in columns]
        sql = f"UPDATE templates SET {sets} WHERE name = ?"
        updated = await self._write_returning(_TEMPLATES, sql, *values, template.name)
        if updated is None:
            raise NotFound(f"template {template.name!r} does not exist")
        return updated

    async def get_template(self, name: str) -> Template | None:
        """Return one template."""
        return await self._fetch_one(_TEMPLATES, f"{_TEMPLATES.select} WHERE name = ?", name)

    async def list_templates(self) -> list[Template]:
        """Return every template, by name."""
        return await self._fetch(_TEMPLATES, f"{_TEMPLATES.select} ORDER BY name")

    async def delete_template(self, name: str) -> bool:
        """Delete; return whether one was deleted (sessions keep their snapshot)."""
        return await self._write("DELETE FROM templates WHERE name = ?", name) > 0

    # -- sessions ---------------------------------------------------------------------

    async def create_session(self, session: Session) -> Session:
        """Insert; ``Conflict`` if the id is taken."""
        return await self._insert(_SESSIONS, session, f"session {session.id!r} already exists")

    async def get_session(self, session_id: str) -> Session | None:
        """Return one session."""
        return await self._fetch_one(_SESSIONS, f"{_SESSIONS.select} WHERE id = ?", session_id)

    @staticmethod
    def _session_filter(
        user: str | None, agent_id: str | None, states: Sequence[str] | None
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if user is not None:
            clauses.append('"user" = ?')
            args.append(user)
        if agent_id is not None:
            clauses.append("agent_id = ?")
            args.append(agent_id)
        if states is not None:
            states = list(states)
            clauses.append(f"state IN {_in(states)}" if states else "1 = 0")
            args.extend(states)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    async def list_sessions(
        self,
        *,
        user: str | None = None,
        states: Sequence[str] | None = None,
        agent_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Session], int]:
        """Return one page of sessions, newest first, and how many match in all."""
        where, args = self._session_filter(user, agent_id, states)
        page = f"{_SESSIONS.select}{where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        async with self._connection() as conn:
            total = await conn.fetchval(f"SELECT COUNT(*) FROM sessions{where}", *args)
            rows = await conn.fetch(page, *args, max(limit, 0), max(offset, 0))
        return self._load_all(_SESSIONS, rows), _int(total)

    async def count_sessions(
        self, *, user: str | None = None, agent_id: str | None = None, states: Sequence[str]
    ) -> int:
        """Count sessions of a user and/or an agent in ``states``."""
        where, args = self._session_filter(user, agent_id, states)
        async with self._connection() as conn:
            return _int(await conn.fetchval(f"SELECT COUNT(*) FROM sessions{where}", *args))

    async def update_session(
        self, session_id: str, *, expected_generation: int | None = None, **fields: Any
    ) -> Session | None:
        """Set ``fields`` and ``updated_at`` in one ``UPDATE``, compare-and-set on generation.

        Raises:
            ValueError: a field is not a :class:`Session` field (or is ``id``), or its value
                is invalid (a :class:`pydantic.ValidationError`).
        """
        unknown = sorted(set(fields) - set(_SESSION_FIELDS))
        if unknown:
            raise ValueError(f"update_session: not updatable Session fields: {', '.join(unknown)}")
        values = {name: _SESSION_FIELDS[name].validate_python(v) for name, v in fields.items()}
        values.setdefault("updated_at", utcnow())
        kinds = _SESSIONS.kinds
        sets = ", ".join(f"{_quote(c)} = ?" for c in values)
        args = [self._dump(kinds[c], v) for c, v in values.items()]
        sql = f"UPDATE sessions SET {sets} WHERE id = ?"
        args.append(session_id)
        if expected_generation is not None:
            sql += " AND generation = ?"
            args.append(expected_generation)
        return await self._write_returning(_SESSIONS, sql, *args)

    async def place_session(self, session_id: str, agent_id: str, platform: str) -> bool:
        """Set agent, platform and ``scheduled`` (clearing the pending reason), atomically.

        The ``WHERE state = 'pending' AND agent_id IS NULL`` makes the first placement the
        only one: a concurrent second ``UPDATE`` finds nothing left to match.
        """
        sql = (
            "UPDATE sessions SET agent_id = ?, platform = ?, state = 'scheduled', reason = '', "
            "updated_at = ? WHERE id = ? AND state = 'pending' AND agent_id IS NULL"
        )
        return await self._write(sql, agent_id, platform, self._time(utcnow()), session_id) > 0

    async def delete_session(self, session_id: str) -> bool:
        """Delete a session with its events and commands, in one transaction.

        The foreign keys cascade too; deleting explicitly keeps it true on a database
        where they are not enforced.
        """
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM session_events WHERE session_id = ?", session_id)
            await conn.execute("DELETE FROM agent_commands WHERE session_id = ?", session_id)
            return await conn.execute("DELETE FROM sessions WHERE id = ?", session_id) > 0

    # -- commands ---------------------------------------------------------------------

    async def enqueue_command(self, command: CommandRecord) -> CommandRecord:
        """Insert unless ``(session_id, generation, command_type)`` exists; return the row.

        Raises:
            Conflict: the ``command_id`` is taken by another command.
            NotFound: the session does not exist.
        """
        sql = f"{_COMMANDS.insert} ON CONFLICT (session_id, generation, command_type) DO NOTHING"
        select = f"{_COMMANDS.select} WHERE session_id = ? AND generation = ? AND command_type = ?"
        key = (command.session_id, command.generation, command.command_type)
        try:
            async with self._transaction() as conn:
                await conn.execute(sql, *self._values(_COMMANDS, command))
                row = await conn.fetchrow(select, *key)
        except Conflict as exc:
            raise Conflict(f"command id {command.command_id!r} is taken") from exc
        except NotFound as exc:
            raise NotFound(f"session {command.session_id!r} does not exist") from exc
        if row is None:  # pragma: no cover - the insert or the conflicting row is there
            raise StoreError(f"command {key} vanished while being enqueued")
        return self._load(_COMMANDS, row)

    async def get_command(self, command_id: str) -> CommandRecord | None:
        """Return one command."""
        sql = f"{_COMMANDS.select} WHERE command_id = ?"
        return await self._fetch_one(_COMMANDS, sql, command_id)

    async def due_commands(
        self, agent_id: str, now: datetime, limit: int = 100
    ) -> list[CommandRecord]:
        """Return the agent's pending or sent commands due by ``now``, oldest first."""
        sql = (
            f"{_COMMANDS.select} WHERE agent_id = ? AND status IN ('pending', 'sent') "
            "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
            "ORDER BY created_at, command_id LIMIT ?"
        )
        return await self._fetch(_COMMANDS, sql, agent_id, self._time(now), limit)

    async def due_agents(self, now: datetime) -> list[str]:
        """Return the agents with a pending or sent command due by ``now``, by id."""
        sql = (
            "SELECT DISTINCT agent_id FROM agent_commands WHERE status IN ('pending', 'sent') "
            "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY agent_id"
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, self._time(now))
        return [str(row["agent_id"]) for row in rows]

    async def mark_command_sent(
        self, command_id: str, at: datetime, next_attempt_at: datetime
    ) -> bool:
        """Record a send of a command not yet final; an acked one stays acked."""
        sql = (
            "UPDATE agent_commands SET "
            "status = CASE WHEN status = 'acked' THEN 'acked' ELSE 'sent' END, "
            "attempts = attempts + 1, sent_at = ?, next_attempt_at = ? "
            f"WHERE command_id = ? AND status IN {_in(_OPEN_STATUSES)}"
        )
        args = (self._time(at), self._time(next_attempt_at), command_id, *_OPEN_STATUSES)
        return await self._write(sql, *args) > 0

    async def mark_command_acked(self, command_id: str, at: datetime) -> bool:
        """Record an ack of a ``pending`` or ``sent`` command."""
        sql = (
            "UPDATE agent_commands SET status = 'acked', acked_at = ? "
            "WHERE command_id = ? AND status IN ('pending', 'sent')"
        )
        return await self._write(sql, self._time(at), command_id) > 0

    async def finish_command(
        self, command_id: str, status: str, result: dict[str, Any] | None, at: datetime
    ) -> CommandRecord | None:
        """Set a final status once; ``None`` if it was final already or is gone.

        Raises:
            ValueError: ``status`` is not ``completed``, ``failed`` or ``expired``.
        """
        if status not in _FINAL_STATUSES:
            raise ValueError(f"finish_command: {status!r} is not one of {sorted(_FINAL_STATUSES)}")
        sql = (
            "UPDATE agent_commands SET status = ?, result = ?, completed_at = ? "
            f"WHERE command_id = ? AND status IN {_in(_OPEN_STATUSES)}"
        )
        args = (status, self._dump("json", result), self._time(at), command_id, *_OPEN_STATUSES)
        return await self._write_returning(_COMMANDS, sql, *args)

    async def list_commands(
        self, *, session_id: str | None = None, statuses: Sequence[str] | None = None
    ) -> list[CommandRecord]:
        """Return commands, oldest first, optionally of one session and in ``statuses``."""
        clauses: list[str] = []
        args: list[Any] = []
        if session_id is not None:
            clauses.append("session_id = ?")
            args.append(session_id)
        if statuses is not None:
            statuses = list(statuses)
            clauses.append(f"status IN {_in(statuses)}" if statuses else "1 = 0")
            args.extend(statuses)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        sql = f"{_COMMANDS.select}{where} ORDER BY created_at, command_id"
        return await self._fetch(_COMMANDS, sql, *args)

    async def open_commands_before(self, before: datetime) -> list[CommandRecord]:
        """Return commands not final and created before ``before``, oldest first."""
        sql = (
            f"{_COMMANDS.select} WHERE status IN {_in(_OPEN_STATUSES)} AND created_at < ? "
            "ORDER BY created_at, command_id"
        )
        return await self._fetch(_COMMANDS, sql, *_OPEN_STATUSES, self._time(before))

    async def unapplied_results(
        self, states: Sequence[str], finished_before: datetime
    ) -> list[CommandRecord]:
        """Return finished results their sessions may not show, in one query, oldest first.

        It starts from the sessions in ``states`` (indexed) and joins each to the command
        of its current generation through the ``(session_id, generation, ...)`` key.
        """
        states = list(states)
        if not states:
            return []
        columns = ", ".join(f"c.{_quote(c)} AS {_quote(c)}" for c in _COMMANDS.columns)
        sql = (
            f"SELECT {columns} FROM sessions s JOIN agent_commands c "
            "ON c.session_id = s.id AND c.generation = s.generation AND c.agent_id = s.agent_id "
            f"WHERE s.state IN {_in(states)} AND c.status IN ('completed', 'failed') "
            "AND c.result IS NOT NULL AND c.completed_at < ? AND s.updated_at <= c.completed_at "
            "ORDER BY c.completed_at, c.command_id"
        )
        return await self._fetch(_COMMANDS, sql, *states, self._time(finished_before))

    # -- events and audit -------------------------------------------------------------

    async def add_session_event(self, event: SessionEventRecord) -> SessionEventRecord:
        """Insert an event; return it with its id.

        Raises:
            NotFound: the session does not exist.
        """
        try:
            return await self._insert(_EVENTS, event, f"event {event.id} already exists")
        except NotFound as exc:
            raise NotFound(f"session {event.session_id!r} does not exist") from exc

    async def list_session_events(
        self, session_id: str, after_id: int = 0, limit: int = 1000
    ) -> list[SessionEventRecord]:
        """Return a session's events with id above ``after_id``, oldest first."""
        sql = f"{_EVENTS.select} WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?"
        return await self._fetch(_EVENTS, sql, session_id, after_id, limit)

    async def add_audit(self, entry: AuditEntry) -> AuditEntry:
        """Insert an audit entry; return it with its id."""
        return await self._insert(_AUDIT, entry, f"audit entry {entry.id} already exists")

    async def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """Return the newest entries first."""
        return await self._fetch(_AUDIT, f"{_AUDIT.select} ORDER BY id DESC LIMIT ?", limit)
