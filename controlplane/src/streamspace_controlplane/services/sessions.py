"""Sessions as users see them: create, list, read, change the desired state, delete.

A user only ever sees their own sessions: another user's session is "not found", never
"forbidden", so ids cannot be probed. Admins see every session. Changing what a session
should be (``desired_state``) bumps its ``generation`` with a compare-and-set, records an
event and kicks the reconciler, which sends the commands that make it so.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import deque
from collections.abc import Sequence
from types import TracebackType

from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.audit import audit
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import (
    ACTIVE_STATES,
    DesiredState,
    Session,
    SessionEventRecord,
    utcnow,
)
from streamspace_controlplane.schemas import MAX_INT64
from streamspace_controlplane.services import tunnels
from streamspace_controlplane.store.base import Conflict
from streamspace_sdk.hooks import Principal
from streamspace_sdk.platform import SessionState

__all__ = [
    "EventFeed",
    "create_session",
    "delete_session",
    "get_session",
    "list_sessions",
    "new_session_id",
    "open_events",
    "set_desired_state",
]

_TERMINAL: frozenset[str] = frozenset({"stopped", "failed"})
_CAS_ATTEMPTS = 5
_EVENT_PAGE = 1000

_QUOTA_LOCKS = "sessions.quota_locks"
_STRIPES = 64


def _quota_lock(cp: ControlPlane, user: str) -> asyncio.Lock:
    """Return the lock serialising session creation for ``user`` in this process.

    Two concurrent requests of one user then cannot both pass the quota check. The locks
    are striped, so memory stays bounded whatever the number of users.
    """
    locks = cp.extras.get(_QUOTA_LOCKS)
    if not isinstance(locks, list):
        locks = [asyncio.Lock() for _ in range(_STRIPES)]
        cp.extras[_QUOTA_LOCKS] = locks
    digest = hashlib.blake2s(user.encode(), digest_size=2).digest()
    lock: asyncio.Lock = locks[int.from_bytes(digest) % _STRIPES]
    return lock


async def _check_quota(cp: ControlPlane, actor: Principal, owner: str) -> None:
    """Refuse one more active session for ``owner`` past ``MAX_SESSIONS_PER_USER``.

    Call it holding the owner's quota lock.
    """
    limit = cp.settings.max_sessions_per_user
    held = await cp.store.count_sessions(user=owner, states=sorted(ACTIVE_STATES))
    if held >= limit:
        whose = "you hold" if owner == actor.username else f"user {owner!r} holds"
        raise ApiError(
            429,
            "quota_exceeded",
            f"session quota reached: {whose} {held} session(s) that are not stopped and "
            f"the limit is {limit} (MAX_SESSIONS_PER_USER); stop or delete one first",
        )


_STARTING_STATES = ("pending", "scheduled", "starting")
_IN_FLIGHT = "sessions.starts_in_flight"
RETRY_AFTER_S = 2
"""What a creation refused for ``MAX_CONCURRENT_STARTS`` is told to wait: a start takes
about that long, so a slot is likely free by then."""


class _StartSlot:
    """Counts a creation in progress here from its first read to its answer, so that a
    burst of concurrent requests on one replica sees itself in the count, and is refused
    without a store read once this replica alone has ``MAX_CONCURRENT_STARTS`` in flight.
    """

    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    async def __aenter__(self) -> None:
        cp = self._cp
        limit = cp.settings.max_concurrent_starts
        in_flight = int(cp.extras.get(_IN_FLIGHT, 0))
        if limit and in_flight >= limit:
            raise _too_many_starts(in_flight, limit)
        cp.extras[_IN_FLIGHT] = in_flight + 1
        if not limit:
            return
        try:
            starting = await cp.store.count_sessions(states=_STARTING_STATES) + in_flight
        except BaseException:
            cp.extras[_IN_FLIGHT] = int(cp.extras[_IN_FLIGHT]) - 1
            raise
        if starting >= limit:
            cp.extras[_IN_FLIGHT] = int(cp.extras[_IN_FLIGHT]) - 1
            raise _too_many_starts(starting, limit)

    async def __aexit__(self, *exc: object) -> None:
        self._cp.extras[_IN_FLIGHT] = int(self._cp.extras[_IN_FLIGHT]) - 1


def _too_many_starts(starting: int, limit: int) -> ApiError:
    return ApiError(
        429,
        "too_many_starts",
        f"{starting} sessions are starting and at most {limit} may start at once "
        f"(MAX_CONCURRENT_STARTS); retry in {RETRY_AFTER_S}s",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


def new_session_id() -> str:
    """Return a new session id: ``s-`` and 16 hex digits (64 random bits)."""
    return "s-" + secrets.token_hex(8)


def _not_found(session_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no session {session_id!r}")


def _visible(actor: Principal, session: Session | None) -> bool:
    return session is not None and (actor.role == "admin" or session.user == actor.username)


async def get_session(cp: ControlPlane, actor: Principal, session_id: str) -> Session:
    """Return a session the caller may see.

    Raises:
        ApiError: 404 when it does not exist or belongs to another user (for non-admins).
    """
    session = await cp.store.get_session(session_id)
    if session is None or not _visible(actor, session):
        raise _not_found(session_id)
    return session


async def create_session(
    cp: ControlPlane,
    actor: Principal,
    template: str,
    *,
    user: str | None = None,
    region: str | None = None,
    labels: dict[str, str] | None = None,
) -> Session:
    """Create a ``pending`` session that should be ``running`` and kick the scheduler.

    Args:
        cp: The control plane.
        actor: The caller; the owner unless an admin names ``user``.
        template: Template name; its current content is kept as the session's snapshot.
        user: Owner to create it for (admins only).
        region: Region constraint on top of the template's.
        labels: Agent label constraints on top of the template's.

    Raises:
        ApiError: 403 when a user names another owner; 422 for an unknown template, or an
            owner unknown or disabled; 429 when the owner already holds
            ``MAX_SESSIONS_PER_USER`` sessions that are not stopped, or (with
            ``Retry-After``) when ``MAX_CONCURRENT_STARTS`` sessions are being started.
    """
    owner = user or actor.username
    if owner != actor.username and actor.role != "admin":
        raise ApiError(403, "forbidden", "only admins may start sessions for other users")
    async with _StartSlot(cp):
        return await _create(cp, actor, owner, template, region, labels)


async def _create(
    cp: ControlPlane,
    actor: Principal,
    owner: str,
    template: str,
    region: str | None,
    labels: dict[str, str] | None,
) -> Session:
    if owner != actor.username:
        found = await cp.store.get_user(owner)
        if found is None:
            raise ApiError(422, "validation_error", f"no user {owner!r} to own the session")
        if found.disabled:
            raise ApiError(
                422, "validation_error", f"user {owner!r} is disabled and cannot own a new session"
            )
    snapshot = await cp.store.get_template(template)
    if snapshot is None:
        raise ApiError(422, "validation_error", f"no template {template!r}")
    async with _quota_lock(cp, owner):
        await _check_quota(cp, actor, owner)
        created: Session | None = None
        for _ in range(3):  # an id collision is astronomically rare; retry anyway
            now = utcnow()
            try:
                created = await cp.store.create_session(
                    Session(
                        id=new_session_id(),
                        user=owner,
                        template=snapshot.name,
                        template_snapshot=snapshot,
                        desired_state="running",
                        state="pending",
                        generation=1,
                        reason="waiting to be placed on an agent",
                        region=region,
                        labels=dict(labels or {}),
                        created_at=now,
                        updated_at=now,
                    )
                )
                break
            except Conflict:
                continue
        if created is None:
            raise ApiError(409, "conflict", "could not allocate a session id; try again")
    who = "" if owner == actor.username else f" for {owner}"
    await cp.events.record(created, None, f"created by {actor.username}{who}")
    await audit(
        cp,
        actor.username,
        "session.create",
        f"session/{created.id}",
        {"template": snapshot.name, "user": owner},
    )
    cp.scheduler.kick()
    return created


async def list_sessions(
    cp: ControlPlane,
    actor: Principal,
    *,
    state: SessionState | None = None,
    user: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Session], int]:
    """Return one page of the sessions the caller may see, newest first, and the total.

    Raises:
        ApiError: 403 when a non-admin asks for another user's sessions.
    """
    if actor.role != "admin":
        if user is not None and user != actor.username:
            raise ApiError(403, "forbidden", "only admins may list other users' sessions")
        user = actor.username
    states: Sequence[str] | None = [state] if state is not None else None
    return await cp.store.list_sessions(user=user, states=states, limit=limit, offset=offset)


def _refusal(session: Session, target: DesiredState) -> str | None:
    """Return why ``session`` cannot be asked to become ``target``, or ``None``.

    Stopping is always possible. Running is possible from any state, so a stopped or
    failed session can be started again. Hibernating needs compute to release.
    """
    if target == "stopped":
        return None
    if session.forget:
        return "session is being deleted"
    if target == "hibernated":
        if session.desired_state == "stopped" or session.state in ("stopping", "stopped"):
            return "session is stopped or stopping; start it first"
        if session.state == "failed":
            return "session has failed; start it again or stop it"
        if session.state == "pending":
            return "session has not been placed yet; stop it instead"
    return None


async def set_desired_state(
    cp: ControlPlane, actor: Principal, session_id: str, target: DesiredState
) -> Session:
    """Ask for a session to be ``running``, ``hibernated`` or ``stopped``.

    Asking for the state already asked for changes nothing. A session never placed on an
    agent is stopped at once, since there is nothing to tell an agent. A stopped or failed
    session asked to run is started again (with the template snapshot it was created with).

    Raises:
        ApiError: 404 as for :func:`get_session`; 409 for a transition that cannot happen
            (hibernating a stopped, failed or unplaced session; anything but stopping a
            session being deleted) or after repeated concurrent changes; 429 when starting
            a stopped or failed session again would exceed the owner's quota.
    """
    session = await get_session(cp, actor, session_id)
    if target == "running" and session.state not in ACTIVE_STATES:
        # Starting a stopped or failed session again takes a place in the owner's quota.
        async with _quota_lock(cp, session.user):
            if session.desired_state != target:
                await _check_quota(cp, actor, session.user)
            return await _set_desired_state(cp, actor, session_id, target)
    return await _set_desired_state(cp, actor, session_id, target)


async def _set_desired_state(
    cp: ControlPlane, actor: Principal, session_id: str, target: DesiredState
) -> Session:
    for _ in range(_CAS_ATTEMPTS):
        session = await get_session(cp, actor, session_id)
        if session.desired_state == target:
            return session
        refusal = _refusal(session, target)
        if refusal is not None:
            raise ApiError(409, "conflict", f"cannot make the session {target}: {refusal}")
        # A session that ended before it was placed goes back to the scheduler.
        replace = target == "running" and session.agent_id is None and session.state in _TERMINAL
        extra = (
            {"state": "pending", "reason": "waiting to be placed on an agent"} if replace else {}
        )
        updated = await cp.store.update_session(
            session.id,
            expected_generation=session.generation,
            desired_state=target,
            generation=session.generation + 1,
            **extra,
        )
        if updated is not None:
            break
    else:
        raise ApiError(409, "conflict", "the session kept changing; try again")
    previous = session.state if updated.state != session.state else None
    await cp.events.record(updated, previous, f"{actor.username} asked for {target}")
    if target == "stopped" and updated.agent_id is None and updated.state != "stopped":
        stopped = await cp.events.transition(
            updated,
            "stopped",
            "stopped before it was placed on an agent",
            expected_generation=updated.generation,
        )
        updated = stopped or updated
    await audit(
        cp,
        actor.username,
        "session.update",
        f"session/{session_id}",
        {"desired_state": target, "generation": updated.generation},
    )
    if updated.state == "pending":
        cp.scheduler.kick()
    cp.reconciler.touch(updated.id)
    if target != "running":
        await tunnels.revoke(cp, "session", updated.id)
    return updated


async def delete_session(cp: ControlPlane, actor: Principal, session_id: str) -> Session | None:
    """Stop a session and forget it.

    A session that never reached an agent, or has already stopped or failed, is deleted
    at once. Otherwise it is marked to be stopped and forgotten: the reconciler stops it
    and deletes the row once the agent reports it stopped.

    Returns:
        ``None`` when deleted at once; else the session, now stopping.

    Raises:
        ApiError: 404 as for :func:`get_session`; 409 after repeated concurrent changes.
    """
    for _ in range(_CAS_ATTEMPTS):
        session = await get_session(cp, actor, session_id)
        if session.state in _TERMINAL or (session.agent_id is None and session.state == "pending"):
            if not await cp.store.delete_session(session.id):
                raise _not_found(session_id)
            await audit(cp, actor.username, "session.delete", f"session/{session_id}")
            return None
        if session.forget and session.desired_state == "stopped":
            return session
        bump = session.desired_state != "stopped"
        updated = await cp.store.update_session(
            session.id,
            expected_generation=session.generation,
            desired_state="stopped",
            forget=True,
            generation=session.generation + 1 if bump else session.generation,
        )
        if updated is not None:
            break
    else:
        raise ApiError(409, "conflict", "the session kept changing; try again")
    await cp.events.record(updated, None, f"{actor.username} deleted the session; stopping it")
    await audit(
        cp,
        actor.username,
        "session.delete",
        f"session/{session_id}",
        {"generation": updated.generation, "deferred": True},
    )
    cp.reconciler.touch(updated.id)
    await tunnels.revoke(cp, "session", updated.id)
    return updated


class EventFeed:
    """A session's events: first those stored after ``after_id``, then live ones.

    Use as ``async with`` (it subscribes on entry, so nothing recorded in between is
    lost) and call :meth:`next`. Events recorded by another replica arrive through the
    hub's nudge; when nothing arrives for a while, :meth:`next` checks the store anyway.
    """

    def __init__(self, cp: ControlPlane, session_id: str, after_id: int) -> None:
        self._cp = cp
        self.session_id = session_id
        self.last_id = after_id
        self._backlog: deque[SessionEventRecord] = deque()
        self._queue: asyncio.Queue[SessionEventRecord | None] | None = None
        self._caught_up = False

    async def __aenter__(self) -> EventFeed:
        self._queue = self._cp.events.subscribe(self.session_id)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._queue is not None:
            self._cp.events.unsubscribe(self.session_id, self._queue)
            self._queue = None

    async def _fill(self) -> None:
        page = await self._cp.store.list_session_events(
            self.session_id, after_id=self.last_id, limit=_EVENT_PAGE
        )
        self._backlog.extend(page)
        self._caught_up = len(page) < _EVENT_PAGE

    def _take(self) -> SessionEventRecord | None:
        while self._backlog:
            event = self._backlog.popleft()
            if event.id > self.last_id:
                self.last_id = event.id
                return event
        return None

    async def next(self, timeout_s: float) -> SessionEventRecord | None:
        """Return the next event, or ``None`` when none came within ``timeout_s``."""
        assert self._queue is not None, "use EventFeed as an async context manager"
        event = self._take()
        while event is None and not self._caught_up:
            await self._fill()
            event = self._take()
        if event is not None:
            return event
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self._fill()  # catch what another replica recorded
                return self._take()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives with an event, and the stream would outlive its client.
            try:
                async with asyncio.timeout(remaining):
                    live = await self._queue.get()
            except TimeoutError:
                continue
            if live is None:
                await self._fill()  # another replica recorded it
            else:
                self._backlog.append(live)
            event = self._take()
            if event is not None:
                return event


async def open_events(
    cp: ControlPlane, actor: Principal, session_id: str, after_id: int = 0
) -> EventFeed:
    """Return the event feed of a session the caller may see (enter it with ``async with``).

    Raises:
        ApiError: 404 as for :func:`get_session`.
    """
    await get_session(cp, actor, session_id)
    # No event has an id past what the store holds; one that large could not be compared.
    return EventFeed(cp, session_id, min(after_id, MAX_INT64))
