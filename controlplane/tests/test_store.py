"""The store contract, on both drivers.

Every test taking ``store`` runs twice, on SQLite and on PostgreSQL (see ``conftest.py``);
the few that need one driver's specifics say so in their name.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from streamspace_controlplane.models import (
    AgentRecord,
    AgentToken,
    AuditEntry,
    CommandRecord,
    Session,
    SessionEventRecord,
    Template,
    User,
    utcnow,
)
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store import (
    Conflict,
    LastAdmin,
    NotFound,
    StaleEpoch,
    Store,
    StoreError,
)
from streamspace_controlplane.store._sql import TABLES, load_migrations
from streamspace_controlplane.store.postgres import PostgresStore
from streamspace_controlplane.store.sqlite import SqliteStore
from streamspace_sdk.drivers import STORES, load_driver, load_driver_class
from streamspace_sdk.platform import Capacity, Resources, SessionState, Usage

pytestmark = pytest.mark.asyncio

T0 = datetime(2020, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
"""A fixed instant with microseconds, in the past so that anything stamped now is later."""
PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
LATEST = load_migrations("sqlite")[-1].version


def template(name: str = "xfce", **fields: Any) -> Template:
    fields.setdefault("image", "lscr.io/linuxserver/webtop")
    fields.setdefault("created_at", T0)
    fields.setdefault("updated_at", T0)
    return Template(name=name, **fields)


def session(
    session_id: str = "s-1", *, user: str = "alice", created_at: datetime = T0, **fields: Any
) -> Session:
    return Session(
        id=session_id,
        user=user,
        template="xfce",
        template_snapshot=template(),
        created_at=created_at,
        updated_at=created_at,
        **fields,
    )


def command(
    command_id: str = "c-1",
    *,
    session_id: str = "s-1",
    agent_id: str = "a-1",
    generation: int = 1,
    command_type: str = "start",
    created_at: datetime = T0,
    **fields: Any,
) -> CommandRecord:
    return CommandRecord(
        command_id=command_id,
        agent_id=agent_id,
        session_id=session_id,
        generation=generation,
        command_type=command_type,
        command_data={"type": "command", "action": command_type, "generation": generation},
        created_at=created_at,
        **fields,
    )


def agent(agent_id: str = "a-1", *, conn: str = "conn-1", epoch: int = 0, **fields: Any):
    return AgentRecord(
        agent_id=agent_id,
        platform="process",
        websocket_conn_id=conn,
        fencing_epoch=epoch,
        capacity=Capacity(max_sessions=4),
        **fields,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- lifecycle and migrations ------------------------------------------------------------


async def test_migrate_again_is_a_no_op(store: Store) -> None:
    assert await store.migrate() == []
    assert await store.migrate() == []
    assert await store.schema_version() == LATEST


async def test_both_drivers_ship_the_same_migration_versions() -> None:
    sqlite = [(m.version, m.name) for m in load_migrations("sqlite")]
    postgres = [(m.version, m.name) for m in load_migrations("postgres")]
    assert sqlite == postgres
    assert [v for v, _ in sqlite] == list(range(1, len(sqlite) + 1))


async def test_concurrent_migrate_on_a_fresh_sqlite_file_applies_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    stores = [SqliteStore(path) for _ in range(5)]
    try:
        for s in stores:
            await s.connect()
        assert await stores[0].schema_version() == 0
        results = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(v for applied in results for v in applied) == list(range(1, LATEST + 1))
        assert [await s.schema_version() for s in stores] == [LATEST] * 5
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_migrate_on_a_fresh_postgres_database_applies_once(
    fresh_pg_dsn: str,
) -> None:
    stores = [PostgresStore(fresh_pg_dsn, max_size=2) for _ in range(5)]
    try:
        for s in stores:
            await s.connect()
        assert await stores[0].schema_version() == 0
        results = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(v for applied in results for v in applied) == list(range(1, LATEST + 1))
        assert [await s.schema_version() for s in stores] == [LATEST] * 5
    finally:
        for s in stores:
            await s.close()


async def test_every_model_field_has_a_column(store: Store) -> None:
    """A field added to a model needs a migration adding its column, on both databases."""
    assert isinstance(store, SqliteStore | PostgresStore)
    async with store._connection() as conn:
        for table in TABLES:
            if isinstance(store, SqliteStore):
                rows = await conn.fetch(f"PRAGMA table_info({table.name})")
                columns = {row["name"] for row in rows}
            else:
                rows = await conn.fetch(
                    "SELECT column_name AS name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = ?",
                    table.name,
                )
                columns = {row["name"] for row in rows}
            missing = set(table.model.model_fields) - columns
            assert not missing, f"{table.name} lacks columns {sorted(missing)}: add a migration"


async def test_ping_answers(store: Store) -> None:
    await store.ping()


async def test_connect_and_close_are_idempotent(store: Store) -> None:
    await store.connect()
    await store.ping()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="not connected"):
        await store.ping()
    await store.connect()
    assert await store.get_user("nobody") is None


async def test_driver_errors_come_out_as_store_errors(store: Store) -> None:
    assert isinstance(store, SqliteStore | PostgresStore)
    with pytest.raises(StoreError) as info:
        async with store._connection() as conn:
            await conn.execute("SELECT no_such_column FROM no_such_table")
    assert type(info.value) is StoreError
    assert "no_such" in str(info.value)


async def test_stores_are_entry_points() -> None:
    assert load_driver_class(STORES, "sqlite") is SqliteStore
    assert load_driver_class(STORES, "postgres") is PostgresStore


async def test_drivers_are_built_from_the_control_plane_settings(tmp_path: Path) -> None:
    settings = ControlPlaneSettings(streamspace_home=tmp_path)
    sqlite = load_driver(STORES, "sqlite", settings=settings, base=Store)
    assert isinstance(sqlite, SqliteStore)
    assert sqlite.path == tmp_path / "streamspace.db"
    pg_settings = ControlPlaneSettings(
        db_host="db.example",
        db_port=6543,
        db_name="ss",
        db_user="u",
        db_password=SecretStr("hunter2"),
    )
    postgres = PostgresStore(settings=pg_settings)
    assert "db.example" in repr(postgres)
    assert "6543" in repr(postgres)
    assert "hunter2" not in repr(postgres)


async def test_sqlite_creates_a_private_folder_and_file_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "streamspace.db"
    store = SqliteStore(path)
    await store.connect()
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        async with store._connection() as conn:
            assert await conn.fetchval("PRAGMA journal_mode") == "wal"
            assert await conn.fetchval("PRAGMA foreign_keys") == 1
            assert await conn.fetchval("PRAGMA busy_timeout") == 5000
    finally:
        await store.close()


async def test_sqlite_store_in_memory(tmp_path: Path) -> None:
    store = SqliteStore(":memory:")
    await store.connect()
    try:
        assert await store.migrate() == list(range(1, LATEST + 1))
        await store.create_user(User(username="alice"), "h")
        assert [u.username for u in await store.list_users()] == ["alice"]
    finally:
        await store.close()


async def test_a_store_not_connected_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="connect"):
        await SqliteStore(tmp_path / "x.db").get_user("alice")
    with pytest.raises(StoreError, match="connect"):
        await PostgresStore("postgresql://u@127.0.0.1:1/db").get_user("alice")


async def test_postgres_connect_failure_names_host_and_port() -> None:
    port = free_port()
    store = PostgresStore(f"postgresql://postgres:pw@127.0.0.1:{port}/nodb", connect_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        await store.connect()
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "127.0.0.1" in message
    assert str(port) in message
    assert "nodb" in message
    assert "pw" not in message.replace("pwd", "")


async def test_postgres_missing_database_fails_at_once_naming_it(pg_database: str) -> None:
    dsn = pg_database.rsplit("/", 1)[0] + "/streamspace_no_such_db"
    store = PostgresStore(dsn, connect_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(StoreError, match="streamspace_no_such_db"):
        await store.connect()
    assert time.monotonic() - started < 5


async def test_fixture_store_starts_empty(store: Store) -> None:
    assert await store.list_users() == []
    assert await store.list_sessions() == ([], 0)
    assert await store.list_audit() == []


# -- users -------------------------------------------------------------------------------


async def test_create_and_get_user_with_its_hash(store: Store) -> None:
    user = User(username="alice", role="admin", created_at=T0)
    created = await store.create_user(user, "argon2$hash")
    assert created == user
    got = await store.get_user("alice")
    assert got is not None
    assert got.password_hash == "argon2$hash"
    assert got.role == "admin"
    assert got.created_at == T0
    assert "password_hash" not in got.model_dump()
    assert await store.get_user("bob") is None


async def test_a_taken_username_is_a_conflict(store: Store) -> None:
    await store.create_user(User(username="alice"), "h1")
    with pytest.raises(Conflict, match="alice"):
        await store.create_user(User(username="alice", role="admin"), "h2")
    got = await store.get_user("alice")
    assert got is not None
    assert got.password_hash == "h1"


async def test_list_delete_and_set_password(store: Store) -> None:
    for name in ("carol", "alice", "bob"):
        await store.create_user(User(username=name), f"h-{name}")
    assert [u.username for u in await store.list_users()] == ["alice", "bob", "carol"]
    assert await store.set_password("bob", "new") is True
    assert await store.set_password("nobody", "new") is False
    bob = await store.get_user("bob")
    assert bob is not None
    assert bob.password_hash == "new"
    assert await store.delete_user("bob") is True
    assert await store.delete_user("bob") is False
    assert [u.username for u in await store.list_users()] == ["alice", "carol"]


async def test_a_user_is_enabled_at_epoch_0_and_a_new_password_moves_the_epoch(
    store: Store,
) -> None:
    await store.create_user(User(username="bob"), "h")
    bob = await store.get_user("bob")
    assert bob is not None
    assert (bob.disabled, bob.token_epoch) == (False, 0)
    assert await store.set_password("bob", "h2") is True
    bob = await store.get_user("bob")
    assert bob is not None
    assert (bob.password_hash, bob.token_epoch) == ("h2", 1)


async def test_update_user_sets_role_and_disabled_and_may_revoke_tokens(store: Store) -> None:
    await store.create_user(User(username="bob", created_at=T0), "h-bob")
    updated = await store.update_user("bob", disabled=True, revoke_tokens=True)
    assert updated is not None
    assert (updated.role, updated.disabled, updated.token_epoch) == ("user", True, 1)
    assert updated.password_hash == ""
    assert updated.created_at == T0
    got = await store.get_user("bob")
    assert got is not None
    assert (got.disabled, got.token_epoch, got.password_hash) == (True, 1, "h-bob")
    assert [u.disabled for u in await store.list_users()] == [True]
    promoted = await store.update_user("bob", role="admin")  # disabled is left as it is
    assert promoted is not None
    assert (promoted.role, promoted.disabled, promoted.token_epoch) == ("admin", True, 1)
    enabled = await store.update_user("bob", disabled=False)
    assert enabled is not None
    assert (enabled.disabled, enabled.token_epoch) == (False, 1)
    assert await store.update_user("nobody", disabled=True) is None


async def test_the_last_enabled_admin_is_kept(store: Store) -> None:
    await store.create_user(User(username="alice", role="admin"), "h")
    await store.create_user(User(username="bob", role="admin"), "h")
    await store.create_user(User(username="carol"), "h")
    assert await store.update_user("carol", disabled=True) is not None  # not an admin
    assert await store.update_user("bob", disabled=True) is not None
    with pytest.raises(LastAdmin, match="'alice' is the last enabled admin"):
        await store.update_user("alice", disabled=True)
    with pytest.raises(LastAdmin, match="'alice' is the last enabled admin"):
        await store.update_user("alice", role="user")
    alice = await store.get_user("alice")
    assert alice is not None
    assert (alice.role, alice.disabled) == ("admin", False)
    assert await store.update_user("bob", role="user") is not None  # a disabled admin


async def test_two_admins_disabling_each_other_leave_one_enabled(store: Store) -> None:
    """The check and the write are one transaction, so racing callers cannot both win."""
    await store.create_user(User(username="alice", role="admin"), "h")
    await store.create_user(User(username="bob", role="admin"), "h")
    for _ in range(5):
        results = await asyncio.gather(
            store.update_user("alice", disabled=True),
            store.update_user("bob", disabled=True),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["LastAdmin", "User"]
        enabled = [u.username for u in await store.list_users() if not u.disabled]
        assert len(enabled) == 1
        await store.update_user("alice", disabled=False)
        await store.update_user("bob", disabled=False)


# -- agent tokens ------------------------------------------------------------------------


def token(token_id: str, agent_id: str = "a-1", *, at: datetime = T0) -> AgentToken:
    return AgentToken(
        token_id=token_id, agent_id=agent_id, token_hash=f"sha-{token_id}", created_at=at
    )


async def test_create_find_and_list_tokens(store: Store) -> None:
    await store.create_agent_token(token("t1", at=T0))
    await store.create_agent_token(token("t2", at=T0 + timedelta(seconds=1)))
    await store.create_agent_token(token("t3", "a-2", at=T0 + timedelta(seconds=2)))
    found = await store.find_agent_token("sha-t2")
    assert found is not None
    assert (found.token_id, found.token_hash, found.created_at) == (
        "t2",
        "sha-t2",
        T0 + timedelta(seconds=1),
    )
    assert await store.find_agent_token("sha-none") is None
    assert [t.token_id for t in await store.list_agent_tokens()] == ["t3", "t2", "t1"]
    assert [t.token_id for t in await store.list_agent_tokens("a-1")] == ["t2", "t1"]
    assert await store.list_agent_tokens("a-9") == []


async def test_a_taken_token_id_or_hash_is_a_conflict(store: Store) -> None:
    await store.create_agent_token(token("t1"))
    with pytest.raises(Conflict, match="t1"):
        await store.create_agent_token(token("t1", "a-2"))
    with pytest.raises(Conflict):
        await store.create_agent_token(
            AgentToken(token_id="t2", agent_id="a-1", token_hash="sha-t1")
        )


async def test_revoke_once_and_touch(store: Store) -> None:
    await store.create_agent_token(token("t1"))
    assert await store.revoke_agent_token("t1", T0 + timedelta(hours=1)) is True
    assert await store.revoke_agent_token("t1", T0 + timedelta(hours=2)) is False
    assert await store.revoke_agent_token("nope", T0) is False
    await store.touch_agent_token("t1", T0 + timedelta(minutes=5))
    await store.touch_agent_token("nope", T0)  # no error
    found = await store.find_agent_token("sha-t1")
    assert found is not None
    assert found.revoked_at == T0 + timedelta(hours=1)
    assert found.last_used_at == T0 + timedelta(minutes=5)


# -- agents ------------------------------------------------------------------------------


async def test_register_a_new_agent_makes_it_online(store: Store) -> None:
    record = agent(labels={"gpu": "yes"}, metadata={"version": "0.4.0", "transports": ["ws-mux"]})
    registered = await store.register_agent(record)
    assert registered.status == "online"
    assert registered.websocket_conn_id == "conn-1"
    assert registered.last_heartbeat is not None
    assert registered.labels == {"gpu": "yes"}
    assert registered.metadata == {"version": "0.4.0", "transports": ["ws-mux"]}
    assert registered.capacity == Capacity(max_sessions=4)
    assert await store.get_agent("a-1") == registered
    assert await store.get_agent("a-2") is None


async def test_reregister_updates_the_row_and_keeps_created_at(store: Store) -> None:
    first = await store.register_agent(agent(epoch=1, created_at=T0))
    second = await store.register_agent(
        agent(conn="conn-2", epoch=2, region="eu", created_at=T0 + timedelta(days=1))
    )
    assert second.created_at == first.created_at == T0
    assert (second.websocket_conn_id, second.fencing_epoch, second.region) == ("conn-2", 2, "eu")
    same_epoch = await store.register_agent(agent(conn="conn-3", epoch=2))
    assert same_epoch.websocket_conn_id == "conn-3"


async def test_a_lower_epoch_is_refused_and_changes_nothing(store: Store) -> None:
    await store.register_agent(agent(conn="new", epoch=5))
    with pytest.raises(StaleEpoch) as info:
        await store.register_agent(agent(conn="old", epoch=4))
    assert (info.value.agent_id, info.value.epoch, info.value.highest) == ("a-1", 4, 5)
    stored = await store.get_agent("a-1")
    assert stored is not None
    assert (stored.websocket_conn_id, stored.fencing_epoch) == ("new", 5)


async def test_concurrent_registrations_leave_the_highest_epoch(store: Store) -> None:
    epochs = [3, 1, 5, 2, 4]
    results = await asyncio.gather(
        *(store.register_agent(agent(conn=f"conn-{e}", epoch=e)) for e in epochs),
        return_exceptions=True,
    )
    assert all(isinstance(r, AgentRecord | StaleEpoch) for r in results)
    stored = await store.get_agent("a-1")
    assert stored is not None
    assert (stored.fencing_epoch, stored.websocket_conn_id) == (5, "conn-5")


async def test_heartbeat_only_from_the_current_connection(store: Store) -> None:
    await store.register_agent(agent(conn="old"))
    await store.register_agent(agent(conn="new"))
    at = T0 + timedelta(seconds=30)
    assert await store.heartbeat_agent("a-1", "old", {"sessions": 9}, at) is False
    assert await store.heartbeat_agent("a-1", "new", {"sessions": 2, "cpu_m": 500}, at) is True
    assert await store.heartbeat_agent("a-9", "new", {}, at) is False
    stored = await store.get_agent("a-1")
    assert stored is not None
    assert stored.usage == Usage(sessions=2, cpu_m=500)
    assert stored.last_heartbeat == at


async def test_heartbeat_of_an_agent_marked_offline_is_refused(store: Store) -> None:
    await store.register_agent(agent(conn="c"))
    assert await store.set_agent_offline("a-1") is True
    assert await store.heartbeat_agent("a-1", "c", {}, T0) is False


async def test_heartbeat_with_invalid_usage_is_a_value_error(store: Store) -> None:
    await store.register_agent(agent(conn="c"))
    with pytest.raises(ValueError, match="sessions"):
        await store.heartbeat_agent("a-1", "c", {"sessions": -1}, T0)


async def test_offline_from_an_old_connection_does_nothing(store: Store) -> None:
    await store.register_agent(agent(conn="old"))
    await store.register_agent(agent(conn="new"))
    assert await store.set_agent_offline("a-1", "old") is False
    stored = await store.get_agent("a-1")
    assert stored is not None
    assert (stored.status, stored.websocket_conn_id) == ("online", "new")
    assert await store.set_agent_offline("a-1", "new") is True
    stored = await store.get_agent("a-1")
    assert stored is not None
    assert stored.status == "offline"
    assert await store.set_agent_offline("a-9") is False


async def test_list_and_delete_agents(store: Store) -> None:
    for agent_id in ("b", "c", "a"):
        await store.register_agent(agent(agent_id, conn=agent_id))
    await store.set_agent_offline("b")
    assert [a.agent_id for a in await store.list_agents()] == ["a", "b", "c"]
    assert [a.agent_id for a in await store.list_agents("online")] == ["a", "c"]
    assert [a.agent_id for a in await store.list_agents("offline")] == ["b"]
    assert await store.delete_agent("b") is True
    assert await store.delete_agent("b") is False
    assert [a.agent_id for a in await store.list_agents()] == ["a", "c"]


# -- templates ---------------------------------------------------------------------------


async def test_templates_round_trip_with_nested_json(store: Store) -> None:
    t = template(
        display_name="XFCE ✓",
        command=["Xvnc", ":1"],
        resources=Resources(cpu_request_m=500, memory_limit_mib=2048),
        env={"LANG": "C.UTF-8"},
        persistent_home=True,
        labels={"gpu": "nvidia"},
        platform_options={"tolerations": [{"key": "gpu", "effect": None}], "n": 1.5, "ok": True},
        created_at=T0,
        updated_at=T0,
    )
    assert await store.create_template(t) == t
    assert await store.get_template("xfce") == t
    assert await store.get_template("kde") is None
    with pytest.raises(Conflict, match="xfce"):
        await store.create_template(template())


async def test_update_list_and_delete_templates(store: Store) -> None:
    await store.create_template(template("xfce", created_at=T0, updated_at=T0))
    await store.create_template(template("firefox"))
    changed = template("xfce", image="other:1", created_at=T0 + timedelta(days=9))
    updated = await store.update_template(changed)
    assert updated.image == "other:1"
    assert updated.created_at == T0
    assert updated.updated_at > T0
    assert await store.get_template("xfce") == updated
    with pytest.raises(NotFound, match="kde"):
        await store.update_template(template("kde"))
    assert [t.name for t in await store.list_templates()] == ["firefox", "xfce"]
    assert await store.delete_template("xfce") is True
    assert await store.delete_template("xfce") is False
    assert [t.name for t in await store.list_templates()] == ["firefox"]


# -- sessions ----------------------------------------------------------------------------


async def test_create_and_get_session_round_trips(store: Store) -> None:
    s = session(
        platform_metadata={"pod": "ss-1", "ports": [5900, 6080], "nested": {"a": [None]}},
        labels={"zone": "b"},
        region="eu",
        reason="waiting",
        forget=True,
    )
    assert await store.create_session(s) == s
    got = await store.get_session("s-1")
    assert got == s
    assert got is not None
    assert got.template_snapshot == template()
    assert await store.get_session("s-2") is None
    with pytest.raises(Conflict, match="s-1"):
        await store.create_session(session())


async def test_list_sessions_newest_first_with_total_and_filters(store: Store) -> None:
    for i in range(7):
        await store.create_session(
            session(
                f"s-{i}",
                user="alice" if i % 2 else "bob",
                state="running" if i < 3 else "pending",
                created_at=T0 + timedelta(minutes=i),
            )
        )
    page, total = await store.list_sessions(limit=3)
    assert ([s.id for s in page], total) == (["s-6", "s-5", "s-4"], 7)
    page, total = await store.list_sessions(limit=3, offset=6)
    assert ([s.id for s in page], total) == (["s-0"], 7)
    page, total = await store.list_sessions(user="alice")
    assert ([s.id for s in page], total) == (["s-5", "s-3", "s-1"], 3)
    page, total = await store.list_sessions(user="alice", states=["running"])
    assert ([s.id for s in page], total) == (["s-1"], 1)
    page, total = await store.list_sessions(states=["running", "stopped"], limit=1)
    assert ([s.id for s in page], total) == (["s-2"], 3)
    assert await store.list_sessions(states=[]) == ([], 0)
    assert await store.list_sessions(user="nobody") == ([], 0)


async def test_list_and_count_sessions_of_an_agent(store: Store) -> None:
    for i in range(4):
        await store.create_session(session(f"s-{i}", created_at=T0 + timedelta(seconds=i)))
    assert await store.place_session("s-1", "a-1", "process")
    assert await store.place_session("s-2", "a-1", "process")
    assert await store.place_session("s-3", "a-2", "docker")
    page, total = await store.list_sessions(agent_id="a-1")
    assert ([s.id for s in page], total) == (["s-2", "s-1"], 2)
    assert await store.count_sessions(agent_id="a-1", states=["scheduled"]) == 2
    assert await store.count_sessions(agent_id="a-1", states=["running"]) == 0
    assert await store.count_sessions(user="alice", states=["pending", "scheduled"]) == 4
    assert await store.count_sessions(user="alice", agent_id="a-2", states=["scheduled"]) == 1
    assert await store.count_sessions(user="bob", states=["pending"]) == 0
    assert await store.count_sessions(user="alice", states=[]) == 0


async def test_update_session_sets_fields_and_updated_at(store: Store) -> None:
    await store.create_session(session())
    updated = await store.update_session(
        "s-1",
        state="running",
        platform_metadata={"vnc": {"host": "10.0.0.1", "port": 5900}},
        labels={"x": "y"},
        template_snapshot={"name": "other", "image": "i:2"},
        reason="",
    )
    assert updated is not None
    assert updated.state == "running"
    assert updated.platform_metadata == {"vnc": {"host": "10.0.0.1", "port": 5900}}
    assert updated.template_snapshot.name == "other"
    assert updated.updated_at > T0
    assert updated.created_at == T0
    assert await store.get_session("s-1") == updated
    assert await store.update_session("s-404", state="running") is None


async def test_update_session_rejects_unknown_fields_and_bad_values(store: Store) -> None:
    await store.create_session(session())
    with pytest.raises(ValueError, match="colour"):
        await store.update_session("s-1", colour="blue")
    with pytest.raises(ValueError, match="id"):
        await store.update_session("s-1", id="s-2")
    with pytest.raises(ValidationError):
        await store.update_session("s-1", state="dancing")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        await store.update_session("s-1", generation=0)
    assert await store.get_session("s-1") == session()


async def test_update_session_compare_and_set_on_generation(store: Store) -> None:
    await store.create_session(session())
    moved = await store.update_session("s-1", expected_generation=1, generation=2)
    assert moved is not None
    assert moved.generation == 2
    assert await store.update_session("s-1", expected_generation=1, state="failed") is None
    current = await store.get_session("s-1")
    assert current is not None
    assert (current.generation, current.state) == (2, "pending")


async def test_concurrent_compare_and_set_has_one_winner(store: Store) -> None:
    await store.create_session(session())
    results = await asyncio.gather(
        *(
            store.update_session("s-1", expected_generation=1, generation=2, reason=f"w{i}")
            for i in range(5)
        )
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await store.get_session("s-1") == winners[0]


async def test_place_session_only_once(store: Store) -> None:
    await store.create_session(session(reason="no agent matches"))
    assert await store.place_session("s-1", "a-1", "process") is True
    assert await store.place_session("s-1", "a-2", "docker") is False
    placed = await store.get_session("s-1")
    assert placed is not None
    assert (placed.agent_id, placed.platform, placed.state, placed.reason) == (
        "a-1",
        "process",
        "scheduled",
        "",
    )
    assert await store.place_session("s-404", "a-1", "process") is False
    await store.create_session(session("s-2", state="running"))
    assert await store.place_session("s-2", "a-1", "process") is False


async def test_concurrent_placements_have_one_winner(store: Store) -> None:
    await store.create_session(session())
    agents = [f"a-{i}" for i in range(6)]
    results = await asyncio.gather(*(store.place_session("s-1", a, "process") for a in agents))
    assert results.count(True) == 1
    placed = await store.get_session("s-1")
    assert placed is not None
    assert placed.agent_id == agents[results.index(True)]


async def test_delete_session_cascades_to_events_and_commands(store: Store) -> None:
    await store.create_session(session("s-1"))
    await store.create_session(session("s-2"))
    for sid in ("s-1", "s-2"):
        await store.add_session_event(SessionEventRecord(session_id=sid, state="pending"))
        await store.enqueue_command(command(f"c-{sid}", session_id=sid))
    assert await store.delete_session("s-1") is True
    assert await store.delete_session("s-1") is False
    assert await store.get_session("s-1") is None
    assert await store.list_session_events("s-1") == []
    assert await store.list_commands(session_id="s-1") == []
    assert await store.get_command("c-s-1") is None
    assert len(await store.list_session_events("s-2")) == 1
    assert [c.command_id for c in await store.list_commands()] == ["c-s-2"]


# -- commands ----------------------------------------------------------------------------


async def test_enqueue_is_idempotent_on_session_generation_and_type(store: Store) -> None:
    await store.create_session(session())
    first = await store.enqueue_command(command("c-1"))
    assert first.status == "pending"
    again = await store.enqueue_command(command("c-2", created_at=T0 + timedelta(seconds=1)))
    assert again == first
    assert await store.get_command("c-2") is None
    other = await store.enqueue_command(command("c-3", generation=2))
    assert other.command_id == "c-3"
    stop = await store.enqueue_command(command("c-4", command_type="stop"))
    assert stop.command_id == "c-4"
    assert [c.command_id for c in await store.list_commands()] == ["c-1", "c-3", "c-4"]


async def test_concurrent_enqueues_make_one_row(store: Store) -> None:
    await store.create_session(session())
    results = await asyncio.gather(*(store.enqueue_command(command(f"c-{i}")) for i in range(5)))
    assert len({r.command_id for r in results}) == 1
    assert len(await store.list_commands(session_id="s-1")) == 1


async def test_enqueue_conflicts_and_missing_session(store: Store) -> None:
    await store.create_session(session())
    await store.enqueue_command(command("c-1"))
    with pytest.raises(Conflict, match="c-1"):
        await store.enqueue_command(command("c-1", generation=2))
    with pytest.raises(NotFound, match="s-404"):
        await store.enqueue_command(command("c-9", session_id="s-404"))


async def test_command_json_and_times_round_trip(store: Store) -> None:
    await store.create_session(session())
    original = command(next_attempt_at=T0.astimezone(PLUS_0530))
    stored = await store.enqueue_command(original)
    assert stored == original
    got = await store.get_command("c-1")
    assert got == original
    assert got is not None
    assert got.command_data == original.command_data
    assert got.next_attempt_at is not None
    assert got.next_attempt_at.tzinfo is UTC
    assert await store.get_command("c-404") is None


async def test_due_commands_oldest_first_and_filtered(store: Store) -> None:
    await store.create_session(session())
    now = T0 + timedelta(hours=1)
    rows = [
        command("c-late", generation=1, created_at=T0 + timedelta(seconds=3)),
        command("c-early", generation=2, created_at=T0 + timedelta(seconds=1)),
        command(
            "c-future",
            generation=3,
            created_at=T0,
            next_attempt_at=now + timedelta(microseconds=1),
        ),
        # Due exactly now, expressed in another zone: compared as instants, not as text.
        command(
            "c-due",
            generation=4,
            created_at=T0 + timedelta(seconds=2),
            next_attempt_at=now.astimezone(PLUS_0530),
        ),
        command("c-other-agent", generation=5, agent_id="a-2"),
        command("c-acked", generation=6, status="acked"),
        command("c-done", generation=7, status="completed"),
        command("c-sent", generation=8, status="sent", created_at=T0 + timedelta(seconds=4)),
    ]
    for row in rows:
        await store.enqueue_command(row)
    due = await store.due_commands("a-1", now)
    assert [c.command_id for c in due] == ["c-early", "c-due", "c-late", "c-sent"]
    assert [c.command_id for c in await store.due_commands("a-1", now, limit=2)] == [
        "c-early",
        "c-due",
    ]
    assert [c.command_id for c in await store.due_commands("a-2", now)] == ["c-other-agent"]
    assert await store.due_commands("a-3", now) == []


async def test_mark_sent_counts_attempts_and_keeps_acked(store: Store) -> None:
    await store.create_session(session())
    await store.enqueue_command(command())
    sent_at = T0 + timedelta(seconds=1)
    retry = T0 + timedelta(seconds=11)
    assert await store.mark_command_sent("c-1", sent_at, retry) is True
    got = await store.get_command("c-1")
    assert got is not None
    assert (got.status, got.attempts, got.sent_at, got.next_attempt_at) == (
        "sent",
        1,
        sent_at,
        retry,
    )
    assert await store.due_commands("a-1", T0 + timedelta(seconds=5)) == []
    assert [c.command_id for c in await store.due_commands("a-1", retry)] == ["c-1"]
    assert await store.mark_command_acked("c-1", T0 + timedelta(seconds=2)) is True
    assert await store.mark_command_sent("c-1", T0 + timedelta(seconds=3), retry) is True
    got = await store.get_command("c-1")
    assert got is not None
    assert (got.status, got.attempts) == ("acked", 2)
    assert await store.finish_command("c-1", "completed", None, T0) is not None
    assert await store.mark_command_sent("c-1", T0, retry) is False
    assert await store.mark_command_sent("c-404", T0, retry) is False


async def test_mark_acked_only_from_pending_or_sent(store: Store) -> None:
    await store.create_session(session())
    await store.enqueue_command(command("c-1"))
    await store.enqueue_command(command("c-2", generation=2))
    assert await store.mark_command_acked("c-1", T0) is True  # from pending
    assert await store.mark_command_acked("c-1", T0 + timedelta(seconds=1)) is False
    got = await store.get_command("c-1")
    assert got is not None
    assert (got.status, got.acked_at) == ("acked", T0)
    await store.mark_command_sent("c-2", T0, T0)
    assert await store.mark_command_acked("c-2", T0) is True  # from sent
    await store.finish_command("c-2", "failed", {"error": "boom"}, T0)
    assert await store.mark_command_acked("c-2", T0) is False
    assert await store.mark_command_acked("c-404", T0) is False


async def test_finish_command_once(store: Store) -> None:
    await store.create_session(session())
    await store.enqueue_command(command())
    result = {"type": "command.result", "ok": True, "status": {"state": "running", "n": [1]}}
    at = T0 + timedelta(seconds=7)
    finished = await store.finish_command("c-1", "completed", result, at)
    assert finished is not None
    assert (finished.status, finished.result, finished.completed_at) == ("completed", result, at)
    assert await store.finish_command("c-1", "failed", {"error": "late"}, at) is None
    assert await store.get_command("c-1") == finished
    assert await store.finish_command("c-404", "expired", None, at) is None
    with pytest.raises(ValueError, match="acked"):
        await store.finish_command("c-1", "acked", None, at)


async def test_list_commands_and_open_commands_before(store: Store) -> None:
    await store.create_session(session("s-1"))
    await store.create_session(session("s-2"))
    await store.enqueue_command(command("c-1", created_at=T0))
    await store.enqueue_command(command("c-2", generation=2, created_at=T0 + timedelta(minutes=1)))
    await store.enqueue_command(
        command("c-3", session_id="s-2", created_at=T0 + timedelta(minutes=2))
    )
    await store.enqueue_command(command("c-4", generation=3, created_at=T0 + timedelta(minutes=3)))
    await store.mark_command_acked("c-2", T0)
    await store.finish_command("c-3", "expired", None, T0)
    assert [c.command_id for c in await store.list_commands()] == ["c-1", "c-2", "c-3", "c-4"]
    assert [c.command_id for c in await store.list_commands(session_id="s-1")] == [
        "c-1",
        "c-2",
        "c-4",
    ]
    by_status = await store.list_commands(statuses=["acked", "expired"])
    assert [c.command_id for c in by_status] == ["c-2", "c-3"]
    assert await store.list_commands(statuses=[]) == []
    before = T0 + timedelta(minutes=3)
    assert [c.command_id for c in await store.open_commands_before(before)] == ["c-1", "c-2"]


# -- events and audit --------------------------------------------------------------------


async def test_session_events_in_order_after_an_id(store: Store) -> None:
    await store.create_session(session("s-1"))
    await store.create_session(session("s-2"))
    stored = []
    states: list[SessionState] = ["pending", "scheduled", "starting", "running"]
    for i, state in enumerate(states):
        event = SessionEventRecord(
            session_id="s-1",
            state=state,
            previous_state=None if i == 0 else "pending",
            detail=f"step {i}",
            at=T0 + timedelta(seconds=i),
        )
        added = await store.add_session_event(event)
        assert added.id > 0
        assert added == event.model_copy(update={"id": added.id})
        stored.append(added)
        await store.add_session_event(SessionEventRecord(session_id="s-2", state="pending"))
    ids = [e.id for e in stored]
    assert ids == sorted(ids)
    assert min(ids) == 1  # a clean store restarts its ids
    assert await store.list_session_events("s-1") == stored
    assert await store.list_session_events("s-1", after_id=ids[1]) == stored[2:]
    assert await store.list_session_events("s-1", after_id=ids[0], limit=2) == stored[1:3]
    assert await store.list_session_events("s-1", after_id=ids[-1]) == []


async def test_an_event_of_a_missing_session_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="s-404"):
        await store.add_session_event(SessionEventRecord(session_id="s-404", state="pending"))


async def test_audit_newest_first(store: Store) -> None:
    added = [
        await store.add_audit(
            AuditEntry(
                actor="alice",
                action="session.create",
                resource=f"session/s-{i}",
                detail={"template": "xfce", "i": i, "tags": ["a", {"b": None}]},
                at=T0 + timedelta(seconds=i),
            )
        )
        for i in range(4)
    ]
    assert [a.id for a in added] == sorted({a.id for a in added})
    assert await store.list_audit() == added[::-1]
    assert await store.list_audit(limit=2) == added[:1:-1]


# -- times -------------------------------------------------------------------------------


async def test_times_come_back_aware_utc_to_the_microsecond(store: Store) -> None:
    odd = datetime(2031, 7, 8, 23, 59, 59, 999999, tzinfo=PLUS_0530)
    await store.create_user(User(username="alice", created_at=odd), "h")
    user = await store.get_user("alice")
    assert user is not None
    assert user.created_at == odd
    assert user.created_at.tzinfo is UTC
    assert user.created_at.microsecond == 999999
    s = await store.create_session(session(created_at=odd))
    assert s.created_at.tzinfo is UTC
    assert s.created_at == odd
    snapshot_time = s.template_snapshot.created_at
    assert snapshot_time.utcoffset() == timedelta(0)
    await store.enqueue_command(command(created_at=odd))
    await store.mark_command_sent("c-1", odd, odd + timedelta(microseconds=1))
    got = await store.get_command("c-1")
    assert got is not None
    for value in (got.created_at, got.sent_at, got.next_attempt_at):
        assert value is not None
        assert value.tzinfo is UTC
    assert got.next_attempt_at == odd + timedelta(microseconds=1)
    assert utcnow() - (await store.register_agent(agent())).created_at < timedelta(minutes=1)


async def test_naive_datetimes_are_refused(store: Store) -> None:
    await store.create_agent_token(token("t1"))
    with pytest.raises(ValueError, match="naive"):
        await store.revoke_agent_token("t1", datetime(2030, 1, 1))


async def test_sqlite_and_store_fixture_work_for_other_tests(sqlite_store: SqliteStore) -> None:
    assert await sqlite_store.schema_version() == LATEST
    assert os.path.basename(str(sqlite_store.path)) == "streamspace.db"
