"""The platform driver contract: what runs sessions (Kubernetes, Docker, processes, VMs).

A driver subclasses :class:`Platform` and implements the underscore methods. The public
methods hold the invariants every driver shares: one operation at a time per session,
idempotency on ``(session_id, generation)``, refusal of stale generations, the standard
labels, and capability checks.
"""

from __future__ import annotations

import asyncio
import socket
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import ClassVar, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, Field, JsonValue, ValidationError

from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import NotSupported, PlatformError, SessionNotFound, StaleGeneration
from streamspace_sdk.settings import StreamSpaceSettings

__all__ = [
    "ACTIONS",
    "LABEL_AGENT_ID",
    "LABEL_MANAGED_BY",
    "LABEL_SESSION_ID",
    "LABEL_TEMPLATE",
    "LABEL_USER",
    "MANAGED_BY",
    "Action",
    "Capacity",
    "Platform",
    "Resources",
    "SessionSpec",
    "SessionState",
    "SessionStatus",
    "Usage",
    "VncEndpoint",
]

M = TypeVar("M", bound=BaseModel)

LABEL_SESSION_ID = "streamspace.io/session-id"
LABEL_AGENT_ID = "streamspace.io/agent-id"
LABEL_USER = "streamspace.io/user"
LABEL_TEMPLATE = "streamspace.io/template"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "streamspace-agent"

SessionState = Literal[
    "pending",
    "scheduled",
    "starting",
    "running",
    "stopping",
    "stopped",
    "hibernated",
    "failed",
    "lost",
]
"""Lifecycle states of DESIGN.md; an agent reports only starting onwards."""

Action = Literal["start", "stop", "hibernate", "wake"]
ACTIONS: tuple[Action, ...] = ("start", "stop", "hibernate", "wake")


class Resources(WireModel):
    """CPU and memory a session asks for and may not exceed; ``None`` means unset."""

    cpu_request_m: int | None = Field(default=None, ge=0)
    """Requested CPU in millicores."""
    cpu_limit_m: int | None = Field(default=None, ge=0)
    """CPU limit in millicores."""
    memory_request_mib: int | None = Field(default=None, ge=0)
    """Requested memory in MiB."""
    memory_limit_mib: int | None = Field(default=None, ge=0)
    """Memory limit in MiB."""


class SessionSpec(WireModel):
    """Everything a platform needs to run one session; built by the control plane."""

    session_id: str = Field(min_length=1, max_length=128)
    """Stable id of the session, unique across the control plane."""
    generation: int = Field(ge=1)
    """Grows by one at every change of desired state; commands are idempotent on it."""
    user: str = Field(min_length=1)
    """Owner's username; names the persistent home."""
    template: str = Field(min_length=1)
    """Template name the session was made from."""
    image: str | None = None
    """Container or VM image; ``None`` for platforms that run commands directly."""
    command: list[str] = Field(default_factory=list)
    """Program and arguments; platforms document the placeholders they fill in."""
    vnc_port: int = Field(default=5900, ge=1, le=65535)
    """Port the session's VNC server listens on, inside the session."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for the session."""
    resources: Resources = Field(default_factory=Resources)
    """CPU and memory requests and limits."""
    persistent_home: bool = False
    """Keep the user's home on storage that outlives the session."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels; the standard ``streamspace.io/*`` labels are added by the platform."""
    platform_options: dict[str, JsonValue] = Field(default_factory=dict)
    """Driver-specific options from the template (node selector, tolerations, ...)."""


class VncEndpoint(WireModel):
    """Where the agent reaches a session's VNC server."""

    host: str
    """Host name or address, as seen from the agent."""
    port: int = Field(ge=1, le=65535)
    """TCP port."""


class SessionStatus(WireModel):
    """What a platform observes about one session."""

    session_id: str
    """The session's id."""
    generation: int = Field(ge=0)
    """The generation of the last command applied to it; 0 when unknown."""
    state: SessionState
    """Observed lifecycle state."""
    detail: str = ""
    """Why it is in that state, for people (e.g. ``ImagePullBackOff``)."""
    vnc: VncEndpoint | None = None
    """Where its VNC server answers, once running."""
    platform_metadata: dict[str, JsonValue] = Field(default_factory=dict)
    """Driver facts worth keeping (container id, pod name, pid)."""
    observed_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    """When this was observed (UTC)."""


class Capacity(WireModel):
    """What an agent may run in total; ``None`` means no limit."""

    max_sessions: int = Field(ge=0)
    """Concurrent sessions."""
    max_cpu_m: int | None = Field(default=None, ge=0)
    """CPU in millicores."""
    max_memory_mib: int | None = Field(default=None, ge=0)
    """Memory in MiB."""


class Usage(WireModel):
    """What an agent's sessions use now, counted against :class:`Capacity`."""

    sessions: int = Field(default=0, ge=0)
    """Sessions that hold resources (starting, running)."""
    cpu_m: int = Field(default=0, ge=0)
    """Requested CPU in millicores."""
    memory_mib: int = Field(default=0, ge=0)
    """Requested memory in MiB."""


_ACTIVE: frozenset[str] = frozenset({"starting", "running"})


class Platform(ABC):
    """Runs sessions. Subclass it, set ``name`` and ``capabilities``, and implement the
    underscore methods; register the class in the ``streamspace.platforms`` entry-point group.

    Contract of the public methods, which drivers inherit:

    * calls for one session run one at a time, calls for different sessions concurrently;
    * ``start``/``wake`` with a generation already applied returns the current status
      without touching the platform; an older generation raises :class:`StaleGeneration`;
    * ``stop`` of an unknown session is a no-op that reports ``stopped``;
    * ``hibernate``/``wake`` raise :class:`NotSupported` unless ``"hibernate"`` is a capability;
    * specs reach the driver with the standard labels set.

    Capabilities: ``hibernate`` (keep storage, drop compute), ``persistent_home``,
    ``adopt`` (``list_sessions`` finds sessions started by an earlier process).
    """

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()

    class Settings(StreamSpaceSettings):
        """The driver's own settings, read from the environment when it is built."""

    def __init__(self, settings: StreamSpaceSettings | None = None, *, agent_id: str) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.agent_id = agent_id
        self._locks: dict[str, asyncio.Lock] = {}

    # -- public API: invariants live here --------------------------------------------------

    async def start(self, spec: SessionSpec) -> SessionStatus:
        """Run the session described by ``spec``; safe to repeat."""
        async with self._lock(spec.session_id):
            current = await self._status(spec.session_id)
            if current is not None and self._already(current, spec.generation, _ACTIVE):
                return current
            return await self._start(self.labelled(spec))

    async def stop(self, session_id: str, generation: int) -> SessionStatus:
        """Stop the session and free its compute; keeps a persistent home."""
        async with self._lock(session_id):
            current = await self._status(session_id)
            if current is None:
                return SessionStatus(session_id=session_id, generation=generation, state="stopped")
            if self._already(current, generation, frozenset({"stopped"})):
                return current
            return await self._stop(session_id, generation)

    async def hibernate(self, session_id: str, generation: int) -> SessionStatus:
        """Drop the session's compute and keep its storage, so ``wake`` resumes it."""
        self._require("hibernate")
        async with self._lock(session_id):
            current = await self._status(session_id)
            if current is None:
                raise SessionNotFound(f"no session {session_id!r} to hibernate")
            if self._already(current, generation, frozenset({"hibernated"})):
                return current
            return await self._hibernate(session_id, generation)

    async def wake(self, spec: SessionSpec) -> SessionStatus:
        """Resume a hibernated session (or start it, if it is gone)."""
        self._require("hibernate")
        async with self._lock(spec.session_id):
            current = await self._status(spec.session_id)
            if current is not None and self._already(current, spec.generation, _ACTIVE):
                return current
            if current is None or current.state in ("stopped", "failed"):
                return await self._start(self.labelled(spec))
            return await self._wake(self.labelled(spec))

    async def status(self, session_id: str) -> SessionStatus | None:
        """Return what the platform sees of the session, or ``None`` if it has none."""
        return await self._status(session_id)

    async def list_sessions(self) -> list[SessionStatus]:
        """Return every session this agent manages, including ones started before a restart."""
        return await self._list_sessions()

    async def vnc_endpoint(self, session_id: str) -> VncEndpoint:
        """Return where the agent connects to reach the session's VNC server."""
        return await self._vnc_endpoint(session_id)

    async def capacity(self) -> Capacity:
        """Return what this agent may run in total."""
        return await self._capacity()

    async def usage(self) -> Usage:
        """Return what the managed sessions hold now (by default: a count of active ones)."""
        sessions = await self._list_sessions()
        return Usage(sessions=sum(1 for s in sessions if s.state in _ACTIVE))

    async def check(self) -> None:
        """Fail now, saying what to fix, if sessions could not start at all (the platform
        unreachable, a required program missing). The agent calls it once at start-up and
        exits on failure; by default it checks nothing.

        Raises:
            PlatformError: what is wrong and how to fix it.

        .. versionadded:: 0.5
        """

    async def close(self) -> None:
        """Release clients and files; sessions keep running."""

    def instance_scope(self) -> str:
        """Return where this platform's sessions live (by default, this host's name).

        Two agent processes with the same scope manage the same sessions, so one may
        replace the other; the control plane refuses a process of another scope while the
        agent's sessions live elsewhere. Drivers whose sessions live in a shared place (a
        cluster namespace, a state directory) say so here.
        """
        return socket.gethostname()

    def options(self, spec: SessionSpec, model: type[M]) -> M:
        """Read the template's ``platform_options`` into the driver's ``model`` (a pydantic
        model, ``extra="forbid"`` so that a misspelt option is refused).

        Raises:
            PlatformError: naming each bad option and the options the driver knows.

        .. versionadded:: 0.5
        """
        try:
            return model.model_validate(spec.platform_options)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}" for e in exc.errors()
            )
            raise PlatformError(
                f"the template's platform_options do not suit the {self.name} platform "
                f"({problems}); it knows: {', '.join(model.model_fields) or 'none'}"
            ) from None

    def labelled(self, spec: SessionSpec) -> SessionSpec:
        """Return ``spec`` with the standard labels set (they win over template labels)."""
        labels = {
            **spec.labels,
            LABEL_SESSION_ID: spec.session_id,
            LABEL_AGENT_ID: self.agent_id,
            LABEL_USER: spec.user,
            LABEL_TEMPLATE: spec.template,
            LABEL_MANAGED_BY: MANAGED_BY,
        }
        return spec.model_copy(update={"labels": labels})

    # -- what drivers implement ------------------------------------------------------------

    @abstractmethod
    async def _start(self, spec: SessionSpec) -> SessionStatus:
        """Create the session's compute (and storage); return ``starting`` or ``running``."""

    @abstractmethod
    async def _stop(self, session_id: str, generation: int) -> SessionStatus:
        """Remove the session's compute; keep a persistent home; return ``stopped``."""

    async def _hibernate(self, session_id: str, generation: int) -> SessionStatus:
        """Drop compute, keep storage; return ``hibernated``."""
        raise NotSupported(f"platform {self.name!r} cannot hibernate")

    async def _wake(self, spec: SessionSpec) -> SessionStatus:
        """Bring a hibernated session back; return ``starting`` or ``running``."""
        raise NotSupported(f"platform {self.name!r} cannot wake")

    @abstractmethod
    async def _status(self, session_id: str) -> SessionStatus | None:
        """Observe one session; ``None`` when the platform has nothing for it."""

    @abstractmethod
    async def _list_sessions(self) -> list[SessionStatus]:
        """Observe every session labelled with this agent's id."""

    @abstractmethod
    async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
        """Locate the VNC server; raise ``SessionNotFound`` when there is none."""

    @abstractmethod
    async def _capacity(self) -> Capacity:
        """Report the totals this agent may hand out."""

    # -- helpers ---------------------------------------------------------------------------

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def _require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise NotSupported(f"platform {self.name!r} lacks capability {capability!r}")

    @staticmethod
    def _already(current: SessionStatus, generation: int, states: frozenset[str]) -> bool:
        if current.generation > generation:
            raise StaleGeneration(
                f"session {current.session_id!r} is at generation {current.generation}; "
                f"refusing generation {generation}"
            )
        return current.generation == generation and current.state in states
