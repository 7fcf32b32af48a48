"""The command outbox: commands are rows, sent while their agent is connected, kept while not.

A command is enqueued as a ``pending`` row of ``agent_commands``, then a per-agent sender
delivers it through the hub and marks it ``sent`` with a deadline. The agent acknowledges it
(``acked``); without an ack by the deadline it is sent again, with the deadline doubling each
time up to a minute. The agent's result finishes the row once (``completed`` or ``failed``)
and drives the session's state machine; a row not finished within ``COMMAND_EXPIRY`` is
``expired`` and its session ``failed``. Agents handle commands idempotently on
``(session_id, generation)``, so every redelivery is safe. A result stored whose session
never moved (the store failed in between) is applied again by the reconciler's full pass,
through :meth:`Dispatcher.reapply_results`.

With several replicas, a pod sends only to the agents whose sockets it holds. A command
enqueued on another pod wakes the holder through the hub; the row is the record of truth,
so if that notice is lost, the holder's sweep of due commands, once a second, finds it.
Expiry is a cluster-wide pass: the leading replica runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import timedelta
from typing import Any

from streamspace_controlplane._loop import FailureLog, KickLoop
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import CommandRecord, Session, utcnow
from streamspace_sdk.platform import Action, SessionSpec, SessionState, SessionStatus
from streamspace_sdk.protocol import Command, CommandAck, CommandResult, Error

__all__ = ["MAX_BACKOFF_S", "Dispatcher", "dispatcher_of", "format_duration"]

logger = logging.getLogger("streamspace.controlplane.dispatcher")

MAX_BACKOFF_S = 60.0
"""Longest wait for an ack before sending again; the ack timeout doubles up to this."""

_FLUSH_LIMIT = 10_000
"""Most commands sent at once to an agent that has just registered."""

_FAR_FUTURE = timedelta(days=36500)

_EXTRA_KEY = "dispatcher"

_AWAITING_RESULT: dict[str, frozenset[str]] = {
    "start": frozenset({"scheduled", "starting"}),
    "wake": frozenset({"hibernated", "starting"}),
    "hibernate": frozenset({"starting", "running"}),
    "stop": frozenset({"stopping", "failed"}),
}
"""Per command type: the states its session is in until the result moves it (the state
before the ack and the one the ack moves it to). Anywhere else, something newer happened."""


def dispatcher_of(cp: ControlPlane) -> Dispatcher:
    """Return the process's dispatcher (built with the control plane)."""
    dispatcher = cp.extras.get(_EXTRA_KEY)
    if not isinstance(dispatcher, Dispatcher):
        raise RuntimeError(
            "this control plane has no Dispatcher; build it with build_control_plane"
        )
    return dispatcher


def format_duration(seconds: float) -> str:
    """Return ``seconds`` the way durations are configured: ``500ms``, ``30s``, ``10m``, ``2h``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def new_command_id() -> str:
    """Return a fresh command id, ``c-`` and 16 hex digits."""
    return f"c-{secrets.token_hex(8)}"


def build_spec(session: Session) -> SessionSpec:
    """Return the spec of ``session`` at its current generation, from its template snapshot."""
    template = session.template_snapshot
    return SessionSpec(
        session_id=session.id,
        generation=session.generation,
        user=session.user,
        template=session.template,
        image=template.image,
        command=list(template.command),
        vnc_port=template.vnc_port,
        env=dict(template.env),
        resources=template.resources,
        persistent_home=template.persistent_home,
        labels={**template.labels, **session.labels},
        platform_options=dict(template.platform_options),
    )


def status_metadata(session: Session, status: SessionStatus | None) -> dict[str, Any]:
    """Return the ``platform_metadata`` to keep for a status report (VNC endpoint included)."""
    if status is None:
        return dict(session.platform_metadata)
    metadata: dict[str, Any] = dict(status.platform_metadata)
    if status.vnc is not None:
        metadata["vnc"] = status.vnc.model_dump(mode="json")
    return metadata


class Dispatcher(KickLoop):
    """The outbox of agent commands, and what their results do to sessions.

    Args:
        cp: The control plane; the dispatcher registers itself in ``cp.extras`` so that
            :func:`dispatcher_of` finds it.
        sweep_interval_s: How often commands are checked for expiry; by default a second,
            or a quarter of ``COMMAND_EXPIRY`` if that is shorter.
        idle_poll_s: Longest a sender sleeps without being woken before it looks at the
            store again; a safety net, since enqueues and registrations wake it.
        result_grace_s: How long a stored result may take to move its session before
            :meth:`reapply_results` counts it as lost; by default four times
            ``DATABASE_TIMEOUT``.
    """

    def __init__(
        self,
        cp: ControlPlane,
        *,
        sweep_interval_s: float | None = None,
        idle_poll_s: float = 30.0,
        result_grace_s: float | None = None,
    ) -> None:
        settings = cp.settings
        super().__init__(
            "dispatcher",
            sweep_interval_s
            if sweep_interval_s is not None
            else min(1.0, settings.command_expiry / 4),
        )
        self.cp = cp
        self.ack_timeout_s = settings.command_ack_timeout
        """First wait for an ack before sending again (``COMMAND_ACK_TIMEOUT``)."""
        self.expiry_s = settings.command_expiry
        """A command not finished this long after it was enqueued expires."""
        self.idle_poll_s = idle_poll_s
        self.result_grace_s = (
            result_grace_s if result_grace_s is not None else 4 * settings.database_timeout
        )
        """A result moves its session two statements after it is stored (read the session,
        update it), each allowed ``DATABASE_TIMEOUT`` and as long again for a pooled
        connection: one stored longer ago, its session unchanged, will not move it."""
        self._wake: dict[str, asyncio.Event] = {}
        self._flush: set[str] = set()
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._unacked: dict[str, dict[str, float]] = {}
        """Per agent: command id → loop time its ack is due, for commands sent here."""
        self._first_sent: dict[str, float] = {}
        """Command id → loop time of its first send here (for the round-trip histogram)."""
        cp.extras[_EXTRA_KEY] = self

    # -- lifecycle --------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop the expiry sweep and every sender."""
        await super().stop()
        senders = list(self._senders.values())
        self._senders.clear()
        for task in senders:
            task.cancel()
        for task in senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- enqueue and deliver ----------------------------------------------------------------

    async def enqueue(self, session: Session, action: Action) -> CommandRecord:
        """Store a command bringing ``session`` to ``action``'s state at its generation.

        Idempotent on ``(session_id, generation, action)``: the row already stored is
        returned, and not sent again unless it is still unfinished.

        Raises:
            ValueError: The session is not placed on an agent.
        """
        if session.agent_id is None:
            raise ValueError(f"session {session.id} is not placed on an agent")
        command_id = new_command_id()
        frame = Command(
            command_id=command_id,
            session_id=session.id,
            generation=session.generation,
            action=action,
            spec=build_spec(session),
        )
        record = await self.cp.store.enqueue_command(
            CommandRecord(
                command_id=command_id,
                agent_id=session.agent_id,
                session_id=session.id,
                generation=session.generation,
                command_type=action,
                command_data=frame.model_dump(mode="json"),
            )
        )
        if record.command_id == command_id:
            logger.info(
                "Queued %s of session %s (generation %d) for agent %s",
                action,
                session.id,
                session.generation,
                session.agent_id,
            )
        if record.status in ("pending", "sent"):
            self.wake(record.agent_id)
        return record

    def wake(self, agent_id: str) -> None:
        """Make the agent's sender look for due commands now, on the replica that holds it."""
        if self.cp.hub.local(agent_id) is None:
            self.cp.hub.notify_holder(agent_id, "wake")
            return
        self._wake.setdefault(agent_id, asyncio.Event()).set()
        task = self._senders.get(agent_id)
        if task is None or task.done():
            self._senders[agent_id] = asyncio.create_task(
                self._sender(agent_id), name=f"streamspace-sender-{agent_id}"
            )

    def agent_connected(self, agent_id: str) -> None:
        """Send the agent every command it has not finished, due or not (it just registered)."""
        self._flush.add(agent_id)
        self._unacked.pop(agent_id, None)
        self.wake(agent_id)

    def agent_disconnected(self, agent_id: str) -> None:
        """Let the agent's sender end; its commands stay in the outbox for its return."""
        self._unacked.pop(agent_id, None)
        event = self._wake.get(agent_id)
        if event is not None:
            event.set()

    async def _sender(self, agent_id: str) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake.setdefault(agent_id, asyncio.Event())
        failures = FailureLog(f"Sending commands to agent {agent_id}")
        try:
            while self.cp.hub.local(agent_id) is not None:
                wake.clear()
                flush = agent_id in self._flush
                self._flush.discard(agent_id)
                try:
                    await self._send_due(agent_id, flush=flush)
                except Exception as exc:
                    failures.failed(exc, "will retry")
                    if flush:
                        self._flush.add(agent_id)
                else:
                    failures.worked()
                deadlines = self._unacked.get(agent_id)
                timeout = self.idle_poll_s
                if deadlines:
                    timeout = min(timeout, max(0.0, min(deadlines.values()) - loop.time()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await wake.wait()
        finally:
            if self._senders.get(agent_id) is asyncio.current_task():
                del self._senders[agent_id]
                self._wake.pop(agent_id, None)

    async def _send_due(self, agent_id: str, *, flush: bool) -> None:
        store = self.cp.store
        now = utcnow()
        if flush:
            commands = await store.due_commands(agent_id, now + _FAR_FUTURE, limit=_FLUSH_LIMIT)
            # Acked commands whose result never came: the agent may have lost them when it
            # went away; it handles a repeat idempotently and answers again.
            acked = [
                c for c in await store.list_commands(statuses=["acked"]) if c.agent_id == agent_id
            ]
            commands = sorted([*commands, *acked], key=lambda c: c.created_at)
        else:
            commands = await store.due_commands(agent_id, now)
        if not commands:
            return
        loop = asyncio.get_running_loop()
        deadlines = self._unacked.setdefault(agent_id, {})
        for command in commands:
            delay = min(self.ack_timeout_s * 2 ** min(command.attempts, 16), MAX_BACKOFF_S)
            if not await store.mark_command_sent(
                command.command_id, now, now + timedelta(seconds=delay)
            ):
                continue  # finished meanwhile
            if not await self.cp.hub.send(agent_id, Command.model_validate(command.command_data)):
                return  # the agent went away; the row is due again when it returns
            if command.attempts:
                logger.info(
                    "Resent %s %s to agent %s (attempt %d)",
                    command.command_type,
                    command.command_id,
                    agent_id,
                    command.attempts + 1,
                )
            self._first_sent.setdefault(command.command_id, loop.time())
            if command.status != "acked":
                deadlines[command.command_id] = loop.time() + delay

    # -- what the agent answers -------------------------------------------------------------

    async def on_ack(self, agent_id: str, ack: CommandAck) -> Error | None:
        """Record an ack; a start or wake moves its session to ``starting``.

        Returns:
            An error frame to send back when the command is not this agent's, else ``None``.
        """
        command = await self.cp.store.get_command(ack.command_id)
        if command is None or command.agent_id != agent_id:
            return _unknown_command(ack.command_id)
        self._unacked.get(agent_id, {}).pop(command.command_id, None)
        if not await self.cp.store.mark_command_acked(command.command_id, utcnow()):
            return None  # a repeat, or already finished
        if command.command_type in ("start", "wake"):
            session = await self.cp.store.get_session(command.session_id)
            if (
                session is not None
                and session.generation == command.generation
                and session.agent_id == agent_id
                and session.state in ("scheduled", "hibernated", "stopped", "failed")
            ):
                verb = "starting" if command.command_type == "start" else "waking"
                await self.cp.events.transition(
                    session,
                    "starting",
                    f"agent {agent_id} is {verb} it",
                    expected_generation=command.generation,
                )
        return None

    async def on_result(self, agent_id: str, result: CommandResult) -> Error | None:
        """Finish a command once and move its session; a repeated result changes nothing.

        Returns:
            An error frame to send back when the result does not match a command of this
            agent, else ``None``.
        """
        store = self.cp.store
        command = await store.get_command(result.command_id)
        if command is None or command.agent_id != agent_id:
            return _unknown_command(result.command_id)
        if (result.session_id, result.generation) != (command.session_id, command.generation):
            return Error(
                code="invalid",
                message=(
                    f"result for session {result.session_id} generation {result.generation} "
                    f"does not match command {command.command_id} (session "
                    f"{command.session_id} generation {command.generation})"
                ),
                ref=result.command_id,
            )
        outcome = "completed" if result.ok else "failed"
        finished = await store.finish_command(
            command.command_id, outcome, result.model_dump(mode="json"), utcnow()
        )
        self._unacked.get(agent_id, {}).pop(command.command_id, None)
        if finished is None:
            return None  # a duplicate: the first one already counted
        first_sent = self._first_sent.pop(command.command_id, None)
        if first_sent is not None:
            self.cp.metrics.command_round_trip.labels(command.command_type, outcome).observe(
                asyncio.get_running_loop().time() - first_sent
            )
        self.cp.metrics.commands.labels(command.command_type, outcome).inc()
        await self._apply_result(finished, result)
        return None

    async def _apply_result(self, command: CommandRecord, result: CommandResult) -> None:
        """Move the session as the result says.

        A failure only counts for the session's current generation: an older command that
        fails (typically with ``StaleGeneration``, because a newer one already ran) says
        nothing about the session now. A success of an older generation is still news about
        what the platform runs, so it updates the actual state (unless a newer stop is
        underway) and the reconciler then issues what the newer generation wants; without
        it, a session whose desired state changed while it was starting would wait forever.
        """
        session = await self.cp.store.get_session(command.session_id)
        if session is None or session.agent_id != command.agent_id:
            return
        current = session.generation == command.generation
        if not current and (not result.ok or session.state == "stopping"):
            logger.info(
                "Result of %s for session %s is for generation %d, but it is at %d now; "
                "recorded without changing its state",
                command.command_type,
                session.id,
                command.generation,
                session.generation,
            )
            return
        metadata = status_metadata(session, result.status)
        if not result.ok:
            reason = result.reason or f"{command.command_type} failed"
            logger.warning("Session %s %s failed: %s", session.id, command.command_type, reason)
            await self.cp.events.transition(
                session,
                "failed",
                reason,
                expected_generation=session.generation,
                platform_metadata=metadata,
            )
            self.cp.scheduler.kick()
            return
        state: SessionState
        detail = ""
        if command.command_type in ("start", "wake"):
            status = result.status
            state = "running"
            if status is not None and status.state in ("starting", "running"):
                state, detail = status.state, status.detail
        elif command.command_type == "hibernate":
            state = "hibernated"
        else:
            state = "stopped"
        updated = await self.cp.events.transition(
            session,
            state,
            detail,
            expected_generation=session.generation,
            platform_metadata=metadata,
        )
        if state == "stopped":
            self.cp.scheduler.kick()
        if not current:
            self.cp.reconciler.kick()
        elif updated is not None and state == "stopped" and updated.forget:
            await self.cp.store.delete_session(updated.id)
            logger.info("Session %s stopped and forgotten", updated.id)

    async def reapply_results(self) -> int:
        """Apply again the results that were stored but never moved their sessions.

        That happens when the store fails after ``finish_command`` and before the session's
        transition: the agent's repeat is then a duplicate and changes nothing. A result
        counts as lost when its command is at the session's current generation and agent,
        the session is still where it was while the command ran (:data:`_AWAITING_RESULT`),
        and it has not changed since the result was stored, ``result_grace_s`` ago or more.
        Applying it changes the session, so a second call finds nothing: idempotent, and a
        session that moved on (a newer generation, a later report) is never moved back.

        Returns:
            How many results were applied again.
        """
        store = self.cp.store
        states = sorted(set().union(*_AWAITING_RESULT.values()))
        before = utcnow() - timedelta(seconds=self.result_grace_s)
        applied = 0
        for command in await store.unapplied_results(states, before):
            session = await store.get_session(command.session_id)
            if (
                session is None
                or command.result is None
                or command.completed_at is None
                or session.state not in _AWAITING_RESULT.get(command.command_type, ())
                or (session.generation, session.agent_id) != (command.generation, command.agent_id)
                or session.updated_at > command.completed_at
            ):
                continue
            logger.warning(
                "Session %s is still %s, but the %s result of generation %d was stored at %s; "
                "applying it now",
                session.id,
                session.state,
                command.command_type,
                command.generation,
                command.completed_at.isoformat(timespec="seconds"),
            )
            await self._apply_result(command, CommandResult.model_validate(command.result))
            applied += 1
        return applied

    # -- expiry -----------------------------------------------------------------------------

    async def _pass(self) -> None:
        await self.wake_due()
        if self.cp.hub.leading():
            await self.expire_commands()

    async def wake_due(self) -> None:
        """Wake the senders of this replica's agents that have commands due (enqueued on
        another replica, or due for a resend)."""
        hub = self.cp.hub
        for agent_id in await self.cp.store.due_agents(utcnow()):
            if hub.local(agent_id) is not None:
                self.wake(agent_id)

    async def expire_commands(self) -> int:
        """Expire commands unfinished past ``COMMAND_EXPIRY``; fail their sessions.

        Returns:
            How many commands this call expired.
        """
        store = self.cp.store
        now = utcnow()
        expired = 0
        for command in await store.open_commands_before(now - timedelta(seconds=self.expiry_s)):
            finished = await store.finish_command(command.command_id, "expired", None, now)
            if finished is None:
                continue
            expired += 1
            self._first_sent.pop(command.command_id, None)
            self._unacked.get(command.agent_id, {}).pop(command.command_id, None)
            self.cp.metrics.commands.labels(command.command_type, "expired").inc()
            reason = (
                f"agent {command.agent_id} did not complete {command.command_type} "
                f"in {format_duration(self.expiry_s)}"
            )
            logger.warning("Command %s expired: %s", command.command_id, reason)
            session = await store.get_session(command.session_id)
            if (
                session is not None
                and session.generation == command.generation
                and session.agent_id == command.agent_id
                and session.state not in ("stopped", "failed")
            ):
                await self.cp.events.transition(
                    session, "failed", reason, expected_generation=command.generation
                )
                self.cp.scheduler.kick()
        return expired


def _unknown_command(command_id: str) -> Error:
    return Error(
        code="unknown_command",
        message=f"no command {command_id} was sent to this agent",
        ref=command_id,
    )
