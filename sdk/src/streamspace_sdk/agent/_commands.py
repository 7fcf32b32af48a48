"""Carrying out commands: one at a time per session, concurrently across sessions."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import PlatformError, SessionVetoed, StreamSpaceError
from streamspace_sdk.hooks import Hooks
from streamspace_sdk.platform import Platform, SessionStatus
from streamspace_sdk.protocol import Command, CommandResult

__all__ = ["RESULT_MEMORY", "CommandRunner"]

logger = logging.getLogger("streamspace.agent")

RESULT_MEMORY = 1024
"""Results remembered (sent, and not yet sent) per agent. A redelivered command whose
result is remembered is answered from memory; an older one is carried out again, which
the platform's idempotency on ``(session_id, generation)`` makes safe."""


class CommandRunner:
    """Run commands through the platform and deliver their results, exactly as asked.

    * Commands for one session run one after another, in arrival order, each in its
      session's queue; sessions' queues run concurrently. A queue and its task exist only
      while it holds commands.
    * ``start`` and ``wake`` pass the spec through ``prepare_session_spec`` first.
    * Every command ends in one ``command.result``: ``ok`` with the platform's status, or
      ``ok=false`` with the reason: the message of a ``PlatformError`` (``StaleGeneration``,
      ``NotSupported``, ...) or ``SessionVetoed``, or ``internal error: ...`` for anything
      unexpected, which is also logged with its traceback.
    * A result that cannot be sent (no registered connection) waits in ``unsent`` and goes
      out at :meth:`flush`, after the next registration. A command delivered again while it
      runs is ignored (its result will come); one delivered again after it finished is
      answered with the remembered result. Both memories hold at most :data:`RESULT_MEMORY`.

    Args:
        platform: what carries the commands out.
        hooks: for ``prepare_session_spec``.
        agent_id: passed to ``prepare_session_spec``.
        send: sends a frame on the current registered connection; ``False`` if there is none.
        observe: called with the session's status after each command (for status reports).
    """

    def __init__(
        self,
        *,
        platform: Platform,
        hooks: Hooks,
        agent_id: str,
        send: Callable[[WireModel], Awaitable[bool]],
        observe: Callable[[SessionStatus], Awaitable[None]],
    ) -> None:
        self._platform = platform
        self._hooks = hooks
        self._agent_id = agent_id
        self._send = send
        self._observe = observe
        self._queues: dict[str, deque[Command]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._running: set[str] = set()
        """Ids of the commands queued or running."""
        self._unsent: OrderedDict[str, CommandResult] = OrderedDict()
        self._sent: OrderedDict[str, CommandResult] = OrderedDict()

    @property
    def in_flight(self) -> int:
        """How many commands are queued or running."""
        return len(self._running)

    @property
    def unsent(self) -> list[CommandResult]:
        """Results waiting for a connection, oldest first."""
        return list(self._unsent.values())

    def busy(self, session_id: str) -> bool:
        """Return whether a command for ``session_id`` is queued or running."""
        return session_id in self._queues

    async def receive(self, command: Command) -> None:
        """Take a command that has been acknowledged: run it, or answer a repeat."""
        if command.command_id in self._running:
            logger.debug("Command %s is already being carried out", command.command_id)
            return
        remembered = self._unsent.get(command.command_id) or self._sent.get(command.command_id)
        if remembered is not None:
            logger.info(
                "Command %s was delivered again; answering with its result", command.command_id
            )
            await self._deliver(remembered)
            return
        self._running.add(command.command_id)
        queue = self._queues.get(command.session_id)
        # "Received start_session command for session <id>" is the seed guide's wording.
        waiting = f"; waits for {len(queue)} earlier command(s) of the session" if queue else ""
        logger.info(
            "Received %s_session command for session %s (command %s, generation %d)%s",
            command.action,
            command.session_id,
            command.command_id,
            command.generation,
            waiting,
        )
        if queue is not None:
            queue.append(command)
            return
        queue = self._queues[command.session_id] = deque([command])
        self._workers[command.session_id] = asyncio.create_task(
            self._drain(command.session_id, queue), name=f"session {command.session_id}"
        )

    async def flush(self) -> None:
        """Send the results that are waiting, oldest first, while the connection takes them."""
        while self._unsent:
            command_id, result = next(iter(self._unsent.items()))
            if not await self._send(result):
                return
            self._unsent.pop(command_id, None)
            self._remember(self._sent, result)
            logger.info("Sent the result of command %s held while disconnected", command_id)

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the queued and running commands to finish.

        Returns:
            Whether they all finished in time; the rest are cancelled.
        """
        workers = set(self._workers.values())
        if workers:
            _, pending = await asyncio.wait(workers, timeout=timeout_s)
            if pending:
                logger.warning(
                    "Commands still running after %gs: %d; abandoning them (the control plane "
                    "sends unfinished commands again)",
                    timeout_s,
                    len(self._running),
                )
                await self.cancel()
                return False
        return True

    async def cancel(self) -> None:
        """Cancel every queued and running command; they get no result."""
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.wait(workers)
        self._queues.clear()
        self._workers.clear()
        self._running.clear()

    # -- inside a session's queue -------------------------------------------------------------

    async def _drain(self, session_id: str, queue: deque[Command]) -> None:
        try:
            while queue:
                command = queue[0]
                result = await self._execute(command)
                await self._deliver(result)
                queue.popleft()
                self._running.discard(command.command_id)
                if result.status is not None:
                    try:
                        await self._observe(result.status)
                    except Exception:
                        logger.exception("Reporting the status of session %s failed", session_id)
        finally:
            if self._queues.get(session_id) is queue:
                del self._queues[session_id]
                del self._workers[session_id]
            for command in queue:
                self._running.discard(command.command_id)

    async def _execute(self, command: Command) -> CommandResult:
        logger.debug(
            "Carrying out command %s: %s session %s (generation %d)",
            command.command_id,
            command.action,
            command.session_id,
            command.generation,
        )
        try:
            status = await self._act(command)
        except (PlatformError, SessionVetoed) as exc:
            reason = str(exc) or type(exc).__name__
            logger.warning(
                "Command %s (%s session %s) failed: %s",
                command.command_id,
                command.action,
                command.session_id,
                reason,
            )
            return command.result(await self._status_after_failure(command), reason=reason)
        except Exception as exc:
            logger.exception(
                "Command %s (%s session %s) failed unexpectedly",
                command.command_id,
                command.action,
                command.session_id,
            )
            reason = f"internal error: {type(exc).__name__}: {exc}"
            return command.result(await self._status_after_failure(command), reason=reason)
        logger.info(
            "Command %s done: session %s is %s",
            command.command_id,
            command.session_id,
            status.state,
        )
        return command.result(status)

    async def _act(self, command: Command) -> SessionStatus:
        platform = self._platform
        if command.action in ("start", "wake"):
            if command.spec is None:  # the protocol refuses such a frame; kept for mypy
                raise PlatformError(f"a {command.action} command needs a spec")
            spec = await self._hooks.prepare_session_spec(command.spec, self._agent_id)
            if command.action == "start":
                return await platform.start(spec)
            return await platform.wake(spec)
        if command.action == "hibernate":
            return await platform.hibernate(command.session_id, command.generation)
        return await platform.stop(command.session_id, command.generation)

    async def _status_after_failure(self, command: Command) -> SessionStatus | None:
        try:
            return await self._platform.status(command.session_id)
        except StreamSpaceError:
            return None
        except Exception:
            logger.exception("Reading the status of session %s failed", command.session_id)
            return None

    async def _deliver(self, result: CommandResult) -> None:
        if await self._send(result):
            self._unsent.pop(result.command_id, None)
            self._remember(self._sent, result)
            return
        logger.info(
            "No connection to send the result of command %s; it goes out after reconnecting",
            result.command_id,
        )
        self._remember(self._unsent, result)

    @staticmethod
    def _remember(memory: OrderedDict[str, CommandResult], result: CommandResult) -> None:
        memory[result.command_id] = result
        memory.move_to_end(result.command_id)
        while len(memory) > RESULT_MEMORY:
            dropped, _ = memory.popitem(last=False)
            logger.debug("Forgot the result of command %s", dropped)
