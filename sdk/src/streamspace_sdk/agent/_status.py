"""Session status: what the agent has observed, and what it has told the control plane."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from streamspace_sdk._models import WireModel
from streamspace_sdk.hooks import Hooks, SessionEvent
from streamspace_sdk.platform import SessionStatus
from streamspace_sdk.protocol import SessionStatusReport

__all__ = ["GONE_DETAIL", "StatusReporter"]

logger = logging.getLogger("streamspace.agent")

GONE_DETAIL = "the platform no longer reports this session"
"""Detail of the ``failed`` report sent when a session vanishes without a command."""

_FINISHED = frozenset({"stopped", "failed"})


def _changed(old: SessionStatus, new: SessionStatus) -> bool:
    return (old.state, old.detail, old.generation) != (new.state, new.detail, new.generation)


class StatusReporter:
    """Report each change of a session once: after commands, and from the periodic poll.

    Two maps are kept, both bounded by the sessions the platform reports: ``reported``,
    what the control plane was told on the current connection (reset by each hello, which
    lists every session), and ``seen``, what the agent last observed, which drives the
    ``session_event`` hook across connections.

    A poll reads the platform without its per-session lock, so its snapshot of a session
    may be older than what a command just reported. The poll therefore skips sessions that
    have a command queued or running, and sessions a command reported after the poll began
    (``mark()`` is taken before the platform is listed).

    Args:
        agent_id: for the ``session_event`` hook.
        hooks: where ``session_event`` goes.
        send: sends a frame on the current registered connection; ``False`` when there is none.
        busy: whether a command for a session is queued or running.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        hooks: Hooks,
        send: Callable[[WireModel], Awaitable[bool]],
        busy: Callable[[str], bool],
    ) -> None:
        self._agent_id = agent_id
        self._hooks = hooks
        self._send = send
        self._busy = busy
        self._reported: dict[str, SessionStatus] = {}
        self._seen: dict[str, SessionStatus] = {}
        self._touched: dict[str, int] = {}
        self._seq = 0

    def mark(self) -> int:
        """Return a marker to pass to :meth:`poll` or :meth:`registered`; take it before listing."""
        return self._seq

    async def registered(self, sessions: Iterable[SessionStatus], since: int) -> None:
        """Start over for a new connection whose hello listed ``sessions``."""
        listed = {s.session_id: s for s in sessions}
        self._reported = dict(listed)
        for status in listed.values():
            if not self._fresh(status.session_id, since):
                await self._see(status, announce_new=False)
        for session_id, last in list(self._seen.items()):
            if session_id not in listed and not self._fresh(session_id, since):
                if last.state not in _FINISHED:
                    await self._see(self._gone(last))
                self._forget(session_id)

    async def observe(self, status: SessionStatus) -> None:
        """Take in the status a command produced, and report it if it changed."""
        self._seq += 1
        self._touched[status.session_id] = self._seq
        await self._see(status)
        await self._report(status)

    async def poll(self, sessions: Iterable[SessionStatus], since: int) -> None:
        """Report what changed in a listing of the platform taken after ``mark()`` gave ``since``.

        A session that vanished from the listing without a command is reported ``failed``,
        as the control plane itself concludes when a reconnecting agent no longer lists it.
        """
        listed: set[str] = set()
        for status in sessions:
            listed.add(status.session_id)
            if self._fresh(status.session_id, since):
                continue
            last = self._reported.get(status.session_id)
            if last is not None and status.generation < last.generation:
                continue  # an older snapshot than what was reported
            await self._see(status)
            await self._report(status)
        for session_id, last in list(self._reported.items()):
            if session_id in listed or self._fresh(session_id, since):
                continue
            if last.state in _FINISHED:
                self._forget(session_id)
                continue
            gone = self._gone(last)
            logger.warning("Session %s is gone: %s", session_id, GONE_DETAIL)
            await self._see(gone)
            await self._report(gone)
        for session_id in [s for s in self._seen if s not in listed and s not in self._reported]:
            if not self._fresh(session_id, since):
                self._forget(session_id)

    # -- helpers ----------------------------------------------------------------------------

    def _fresh(self, session_id: str, since: int) -> bool:
        return self._busy(session_id) or self._touched.get(session_id, -1) > since

    def _forget(self, session_id: str) -> None:
        self._reported.pop(session_id, None)
        self._seen.pop(session_id, None)
        self._touched.pop(session_id, None)

    @staticmethod
    def _gone(last: SessionStatus) -> SessionStatus:
        return SessionStatus(
            session_id=last.session_id,
            generation=last.generation,
            state="failed",
            detail=GONE_DETAIL,
            platform_metadata=last.platform_metadata,
        )

    async def _see(self, status: SessionStatus, *, announce_new: bool = True) -> None:
        previous = self._seen.get(status.session_id)
        self._seen[status.session_id] = status
        if previous is None and not announce_new:
            return
        if previous is not None and previous.state == status.state:
            return
        await self._hooks.session_event(
            SessionEvent(
                session_id=status.session_id,
                state=status.state,
                previous_state=previous.state if previous is not None else None,
                detail=status.detail,
                agent_id=self._agent_id,
            )
        )

    async def _report(self, status: SessionStatus) -> bool:
        last = self._reported.get(status.session_id)
        if last is not None and not _changed(last, status):
            return True
        if not await self._send(SessionStatusReport(status=status)):
            return False
        self._reported[status.session_id] = status
        logger.debug(
            "Reported session %s: %s (generation %d)",
            status.session_id,
            status.state,
            status.generation,
        )
        return True
