"""The store contract: everything the control plane keeps, behind one interface.

Drivers (``sqlite``, ``postgres``) register in ``streamspace.stores`` and apply the same
numbered migrations. Methods that decide between concurrent writers are single atomic
statements or transactions (compare-and-set on a generation, a connection id or an epoch),
so several replicas can share one PostgreSQL without double placement or lost updates.
All times are timezone-aware UTC.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

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
)
from streamspace_sdk.errors import StreamSpaceError
from streamspace_sdk.settings import StreamSpaceSettings

__all__ = ["Conflict", "LastAdmin", "NotFound", "StaleEpoch", "Store", "StoreError"]


class StoreError(StreamSpaceError):
    """The store failed (unreachable, corrupt, not migrated)."""


class Conflict(StoreError):
    """A unique key is taken (user, template, token)."""


class NotFound(StoreError, LookupError):
    """No such row."""


class LastAdmin(StoreError):
    """A change would leave no enabled admin, and so nobody to manage the control plane."""

    def __init__(self, username: str) -> None:
        super().__init__(
            f"{username!r} is the last enabled admin; make another user an admin first"
        )
        self.username = username


class StaleEpoch(StoreError):
    """A registration carries a fencing epoch below the highest seen for that agent."""

    def __init__(self, agent_id: str, epoch: int, highest: int) -> None:
        super().__init__(
            f"agent {agent_id!r} registered with fencing epoch {epoch}, below the highest "
            f"seen ({highest}): a newer leader exists"
        )
        self.agent_id = agent_id
        self.epoch = epoch
        self.highest = highest


class Store(ABC):
    """Persistent state of the control plane. Build it, ``await connect()``, ``migrate()``."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()

    class Settings(StreamSpaceSettings):
        """The driver's own settings."""

    # -- lifecycle ------------------------------------------------------------------------

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection (pool)."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection (pool)."""

    @abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending numbered migrations; safe when several replicas call it at once.

        Returns:
            The versions this call applied (empty when up to date).
        """

    @abstractmethod
    async def schema_version(self) -> int:
        """Return the highest applied migration (0 for an empty database)."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreError`` unless the database answers."""

    # -- users ----------------------------------------------------------------------------

    @abstractmethod
    async def create_user(self, user: User, password_hash: str) -> User:
        """Insert a user; ``Conflict`` if the name is taken."""

    @abstractmethod
    async def get_user(self, username: str) -> User | None:
        """Return the user with ``password_hash`` filled in, or ``None``."""

    @abstractmethod
    async def list_users(self) -> list[User]:
        """Return every user, by name."""

    @abstractmethod
    async def delete_user(self, username: str) -> bool:
        """Delete a user; return whether one was deleted."""

    @abstractmethod
    async def set_password(self, username: str, password_hash: str) -> bool:
        """Replace a user's password hash, and cut off the tokens issued before (their
        ``token_epoch`` grows by one); return whether the user exists."""

    async def update_user(
        self,
        username: str,
        *,
        role: Role | None = None,
        disabled: bool | None = None,
        revoke_tokens: bool = False,
    ) -> User | None:
        """Set a user's role and disabled flag (``None`` leaves one as it is), and with
        ``revoke_tokens`` cut off every token issued so far (``token_epoch`` grows by one).

        Atomic with the rule that one enabled admin remains: demoting or disabling the last
        enabled admin raises :class:`LastAdmin` and changes nothing, however many callers
        race (two admins disabling each other end with one of them enabled).

        The default refuses, so a store written before users could be changed still loads.

        Returns:
            The user as stored now (without its password hash), or ``None`` if absent.
        """
        raise StoreError(f"the {self.name} store cannot change users")

    # -- agent tokens ---------------------------------------------------------------------

    @abstractmethod
    async def create_agent_token(self, token: AgentToken) -> AgentToken:
        """Insert a token (its hash); ``Conflict`` if the id is taken."""

    @abstractmethod
    async def find_agent_token(self, token_hash: str) -> AgentToken | None:
        """Return the token with this hash (revoked or not), or ``None``."""

    @abstractmethod
    async def list_agent_tokens(self, agent_id: str | None = None) -> list[AgentToken]:
        """Return tokens, newest first, optionally of one agent."""

    @abstractmethod
    async def revoke_agent_token(self, token_id: str, at: datetime) -> bool:
        """Mark a token revoked; return whether it existed and was not revoked yet."""

    @abstractmethod
    async def touch_agent_token(self, token_id: str, at: datetime) -> None:
        """Record that the token was just used."""

    # -- agents ---------------------------------------------------------------------------

    @abstractmethod
    async def register_agent(self, agent: AgentRecord) -> AgentRecord:
        """Insert or update the agent as ``online`` with ``agent.websocket_conn_id``.

        Atomic with the fencing check: raises :class:`StaleEpoch` when ``agent.fencing_epoch``
        is below the stored one; otherwise stores the higher of the two.
        """

    @abstractmethod
    async def heartbeat_agent(
        self, agent_id: str, conn_id: str, usage: dict[str, Any], at: datetime
    ) -> bool:
        """Store usage and ``last_heartbeat`` if ``conn_id`` is still the agent's connection.

        Returns:
            False when another connection has taken over (the caller must stop acting).
        """

    @abstractmethod
    async def set_agent_offline(self, agent_id: str, conn_id: str | None = None) -> bool:
        """Mark the agent offline, only if ``conn_id`` (when given) is still its connection.

        This is what keeps the cleanup of an old socket from unregistering a new one.
        """

    @abstractmethod
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        """Return one agent."""

    @abstractmethod
    async def list_agents(self, status: str | None = None) -> list[AgentRecord]:
        """Return agents by id, optionally only those with ``status``."""

    @abstractmethod
    async def delete_agent(self, agent_id: str) -> bool:
        """Forget an agent; return whether one was deleted."""

    # -- templates ------------------------------------------------------------------------

    @abstractmethod
    async def create_template(self, template: Template) -> Template:
        """Insert; ``Conflict`` if the name is taken."""

    @abstractmethod
    async def update_template(self, template: Template) -> Template:
        """Replace by name; ``NotFound`` if absent."""

    @abstractmethod
    async def get_template(self, name: str) -> Template | None:
        """Return one template."""

    @abstractmethod
    async def list_templates(self) -> list[Template]:
        """Return every template, by name."""

    @abstractmethod
    async def delete_template(self, name: str) -> bool:
        """Delete; return whether one was deleted."""

    # -- sessions -------------------------------------------------------------------------

    @abstractmethod
    async def create_session(self, session: Session) -> Session:
        """Insert; ``Conflict`` if the id is taken."""

    @abstractmethod
    async def get_session(self, session_id: str) -> Session | None:
        """Return one session."""

    @abstractmethod
    async def list_sessions(
        self,
        *,
        user: str | None = None,
        states: Sequence[str] | None = None,
        agent_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Session], int]:
        """Return one page of sessions, newest first, and the total matching."""

    @abstractmethod
    async def count_sessions(
        self, *, user: str | None = None, agent_id: str | None = None, states: Sequence[str]
    ) -> int:
        """Count sessions of a user or an agent in ``states``."""

    @abstractmethod
    async def update_session(
        self, session_id: str, *, expected_generation: int | None = None, **fields: Any
    ) -> Session | None:
        """Set ``fields`` (and ``updated_at``) on a session.

        Args:
            expected_generation: when given, update only if the stored generation equals it
                (compare-and-set); a concurrent change makes this return ``None``.

        Returns:
            The updated session, or ``None`` if it is gone or the generation moved on.
        """

    @abstractmethod
    async def place_session(self, session_id: str, agent_id: str, platform: str) -> bool:
        """Assign a ``pending`` unplaced session to an agent and make it ``scheduled``.

        Atomic: only one placement of a session can win.
        """

    @abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Delete a session with its events and commands; return whether it existed."""

    # -- commands (the outbox) ------------------------------------------------------------

    @abstractmethod
    async def enqueue_command(self, command: CommandRecord) -> CommandRecord:
        """Insert a ``pending`` command.

        Idempotent on ``(session_id, generation, command_type)``: enqueuing the same one
        again returns the existing row.
        """

    @abstractmethod
    async def get_command(self, command_id: str) -> CommandRecord | None:
        """Return one command."""

    @abstractmethod
    async def due_commands(
        self, agent_id: str, now: datetime, limit: int = 100
    ) -> list[CommandRecord]:
        """Return the agent's ``pending`` or ``sent`` commands whose ``next_attempt_at`` has
        passed (or is unset), oldest first."""

    async def due_agents(self, now: datetime) -> list[str]:
        """Return the agents with a ``pending`` or ``sent`` command due by ``now``."""
        open_commands = await self.list_commands(statuses=["pending", "sent"])
        due = {c.agent_id for c in open_commands if (c.next_attempt_at or now) <= now}
        return sorted(due)

    @abstractmethod
    async def mark_command_sent(
        self, command_id: str, at: datetime, next_attempt_at: datetime
    ) -> bool:
        """Record a send: status ``sent`` (unless already acked), attempts + 1."""

    @abstractmethod
    async def mark_command_acked(self, command_id: str, at: datetime) -> bool:
        """Record an ack: status ``acked`` if it was ``pending`` or ``sent``."""

    @abstractmethod
    async def finish_command(
        self, command_id: str, status: str, result: dict[str, Any] | None, at: datetime
    ) -> CommandRecord | None:
        """Set a final status (``completed``, ``failed``, ``expired``) once.

        Returns:
            The row if this call finished it; ``None`` if it was already final or is gone,
            so a duplicate result is harmless.
        """

    @abstractmethod
    async def list_commands(
        self, *, session_id: str | None = None, statuses: Sequence[str] | None = None
    ) -> list[CommandRecord]:
        """Return commands, oldest first."""

    @abstractmethod
    async def open_commands_before(self, before: datetime) -> list[CommandRecord]:
        """Return commands not final and created before ``before`` (to expire them)."""

    async def unapplied_results(
        self, states: Sequence[str], finished_before: datetime
    ) -> list[CommandRecord]:
        """Return the results that may never have reached their sessions.

        That is every ``completed`` or ``failed`` command with a stored result, finished
        before ``finished_before``, at its session's current generation and agent, whose
        session is in one of ``states`` and has not been updated since the command
        finished (applying a result always updates its session). Oldest first.

        The default reads every finished command; SQL stores answer in one query.
        """
        found: list[CommandRecord] = []
        for command in await self.list_commands(statuses=["completed", "failed"]):
            if command.result is None or command.completed_at is None:
                continue
            if command.completed_at >= finished_before:
                continue
            session = await self.get_session(command.session_id)
            if (
                session is not None
                and session.state in states
                and (session.generation, session.agent_id) == (command.generation, command.agent_id)
                and session.updated_at <= command.completed_at
            ):
                found.append(command)
        return sorted(found, key=lambda c: (c.completed_at, c.command_id))

    # -- events and audit -----------------------------------------------------------------

    @abstractmethod
    async def add_session_event(self, event: SessionEventRecord) -> SessionEventRecord:
        """Insert an event; return it with its id."""

    @abstractmethod
    async def list_session_events(
        self, session_id: str, after_id: int = 0, limit: int = 1000
    ) -> list[SessionEventRecord]:
        """Return a session's events with id above ``after_id``, oldest first."""

    @abstractmethod
    async def add_audit(self, entry: AuditEntry) -> AuditEntry:
        """Insert an audit entry; return it with its id."""

    @abstractmethod
    async def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """Return the newest entries first."""
