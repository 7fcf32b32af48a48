"""Request and response bodies of the REST API v1.

Every body the API reads or writes is one of these pydantic models, and the OpenAPI
document is generated from them. Request models forbid unknown fields, so a typo is a 422
rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

from streamspace_controlplane.models import (
    AgentRecord,
    AgentStatus,
    AgentToken,
    DesiredState,
    Role,
    Session,
    TemplateSpec,
    User,
)
from streamspace_sdk.platform import SessionState

__all__ = [
    "AgentCapacityOut",
    "AgentOut",
    "AgentTokenCreated",
    "AgentTokenListQuery",
    "AgentTokenOut",
    "ApiModel",
    "ErrorBody",
    "ErrorDetail",
    "EventsQuery",
    "FieldError",
    "HealthOut",
    "LoginRequest",
    "LoginResponse",
    "ReadyOut",
    "SessionCreate",
    "SessionListQuery",
    "SessionOut",
    "SessionPage",
    "SessionPatch",
    "TemplateBody",
    "TemplateCreate",
    "TemplateUpdate",
    "UserCreate",
    "UserOut",
    "UserPatch",
    "VncTokenOut",
]

USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"
TEMPLATE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"

Username = Annotated[str, Field(min_length=1, max_length=64, pattern=USERNAME_PATTERN)]
TemplateName = Annotated[str, Field(min_length=1, max_length=63, pattern=TEMPLATE_NAME_PATTERN)]
AgentId = Annotated[str, Field(min_length=1, max_length=63, pattern=AGENT_ID_PATTERN)]
MAX_PAGE = 500
"""Largest page of ``GET /api/v1/sessions``."""
MAX_INT64 = 2**63 - 1
"""Largest integer the stores hold (SQLite ``INTEGER``, PostgreSQL ``BIGINT``): the bound
of offsets and ids a request may give, so none reaches the store and fails there."""


class ApiModel(BaseModel):
    """Base of API bodies: immutable, unknown fields refused, field docs in the schema."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


# -- errors ------------------------------------------------------------------------------


class FieldError(ApiModel):
    """One invalid field of a request."""

    field: str
    """Dotted path of the field, starting with where it was: ``body``, ``query``, ``header``."""
    message: str
    """What is wrong with it."""


class ErrorDetail(ApiModel):
    """What went wrong."""

    code: str
    """Short machine-readable reason, e.g. ``not_found``, ``validation_error``."""
    message: str
    """The sentence a person reads."""
    fields: list[FieldError] | None = None
    """For ``validation_error``: each invalid field."""


class ErrorBody(ApiModel):
    """The body of every error response."""

    error: ErrorDetail
    """The error."""


# -- health ------------------------------------------------------------------------------


class HealthOut(ApiModel):
    """The process is up."""

    status: Literal["healthy"] = "healthy"
    """Always ``healthy``, as the agent's own ``/health`` says (and the seed guide expects)."""


class ReadyOut(ApiModel):
    """Whether the process can serve requests."""

    status: Literal["ready", "not_ready"]
    """``ready`` when the store answers and its schema is up to date."""
    schema_version: int | None = None
    """Highest migration applied to the store; ``None`` if it could not be read."""
    problems: list[str] = Field(default_factory=list)
    """What is wrong, when not ready."""


# -- auth and users ----------------------------------------------------------------------


class LoginRequest(ApiModel):
    """Credentials to exchange for a token."""

    username: str = Field(min_length=1, max_length=64)
    """The user's name."""
    password: str = Field(min_length=1, max_length=1024)
    """The user's password."""


class LoginResponse(ApiModel):
    """A bearer token for the API."""

    token: str
    """Send as ``Authorization: Bearer <token>``."""
    expires_at: AwareDatetime
    """When it stops being accepted (UTC)."""


class UserCreate(ApiModel):
    """A user to create."""

    username: Username
    """Login name: letters, digits, ``.``, ``_``, ``@``, ``-``; starts with a letter or digit."""
    password: str = Field(min_length=8, max_length=1024)
    """At least 8 characters."""
    role: Role = "user"
    """``admin`` or ``user``."""


class UserPatch(ApiModel):
    """Changes to a user; a field left out (or ``null``) stays as it is."""

    disabled: bool | None = None
    """``true`` refuses the user's logins and tokens and closes their viewers (their
    sessions keep running); ``false`` lets them log in again."""
    role: Role | None = None
    """``admin`` or ``user``."""
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    """A new password, at least 8 characters; the user's tokens issued before are refused
    from then on."""


class UserOut(ApiModel):
    """A user, without their password hash."""

    username: str
    """Login name."""
    role: Role
    """``admin`` or ``user``."""
    disabled: bool
    """A disabled user cannot log in or use their tokens."""
    created_at: AwareDatetime
    """When created."""

    @classmethod
    def of(cls, user: User) -> UserOut:
        """Build from a stored user."""
        return cls(
            username=user.username,
            role=user.role,
            disabled=user.disabled,
            created_at=user.created_at,
        )


# -- templates ---------------------------------------------------------------------------


class TemplateBody(TemplateSpec):
    """The editable fields of a template (the stored model's, so the two never drift)."""


class TemplateCreate(TemplateBody):
    """A template to create."""

    name: TemplateName
    """Unique name, DNS-label style: lower-case letters, digits and ``-``."""


class TemplateUpdate(TemplateBody):
    """The new content of a template; it replaces every field."""

    name: TemplateName | None = None
    """Optional; when given it must equal the name in the path."""


# -- sessions ----------------------------------------------------------------------------


class SessionCreate(ApiModel):
    """A session to start."""

    template: TemplateName
    """Name of the template to start it from."""
    state: Literal["running"] = "running"
    """The state asked for; sessions start ``running``."""
    user: Username | None = None
    """Owner; only an admin may name someone else. Defaults to the caller."""
    region: str | None = Field(default=None, min_length=1, max_length=63)
    """Run it in this region only."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Run it only on agents carrying these labels."""


class SessionPatch(ApiModel):
    """A change of the state a session should be in."""

    state: DesiredState
    """``running``, ``hibernated`` (compute released, storage kept) or ``stopped``."""


class SessionOut(ApiModel):
    """A session: what its owner asked for and what is true."""

    id: str
    """Stable id, ``s-`` and 16 hex digits."""
    user: str
    """Owner."""
    template: str
    """Template it was started from."""
    desired_state: DesiredState
    """What the owner asked for."""
    state: SessionState
    """What is true, as far as the control plane knows."""
    reason: str
    """Why it is in its state (e.g. why it is still pending)."""
    generation: int
    """Grows by one at every change of desired state."""
    agent_id: str | None
    """The agent it is placed on."""
    platform: str | None
    """That agent's platform."""
    region: str | None
    """Region asked for at creation."""
    labels: dict[str, str]
    """Placement labels asked for at creation."""
    deleting: bool
    """Deleted by its owner: the row goes once the session has stopped."""
    created_at: AwareDatetime
    """When created."""
    updated_at: AwareDatetime
    """When last changed."""

    @classmethod
    def of(cls, session: Session) -> SessionOut:
        """Build from a stored session."""
        return cls(
            id=session.id,
            user=session.user,
            template=session.template,
            desired_state=session.desired_state,
            state=session.state,
            reason=session.reason,
            generation=session.generation,
            agent_id=session.agent_id,
            platform=session.platform,
            region=session.region,
            labels=session.labels,
            deleting=session.forget,
            created_at=session.created_at,
            updated_at=session.updated_at,
        )


class SessionPage(ApiModel):
    """One page of sessions, newest first."""

    items: list[SessionOut]
    """The sessions of this page."""
    total: int
    """How many sessions match, over all pages."""
    limit: int
    """Page size asked for."""
    offset: int
    """How many matching sessions come before this page."""


class SessionListQuery(ApiModel):
    """Filters and paging of ``GET /api/v1/sessions``."""

    state: SessionState | None = None
    """Only sessions in this state."""
    user: Username | None = None
    """Only this user's sessions (admins; a user sees only their own anyway)."""
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    """Page size, 1 to 500."""
    offset: int = Field(default=0, ge=0, le=MAX_INT64)
    """Matching sessions to skip."""


class EventsQuery(ApiModel):
    """Where ``GET /api/v1/sessions/{id}/events`` resumes."""

    last_event_id: int | None = Field(default=None, ge=0, le=MAX_INT64)
    """Send only events after this id; the ``Last-Event-ID`` header does the same."""


# -- agents and agent tokens -------------------------------------------------------------


class AgentCapacityOut(ApiModel):
    """What an agent may run, and what it runs as last reported."""

    max_sessions: int
    """Concurrent sessions it accepts."""
    current_sessions: int
    """Sessions it runs now (as last reported)."""
    max_cpu_m: int | None = None
    """CPU it may hand out, millicores; ``None`` is no limit."""
    max_memory_mib: int | None = None
    """Memory it may hand out, MiB; ``None`` is no limit."""
    cpu_m: int = 0
    """CPU requested by its sessions, millicores."""
    memory_mib: int = 0
    """Memory requested by its sessions, MiB."""


class AgentOut(ApiModel):
    """An agent, in the seed guide's shape."""

    agent_id: str
    """Unique id, e.g. ``k8s-prod-us-east-1``."""
    status: AgentStatus
    """``online`` while a registered socket is heartbeating."""
    platform: str
    """Platform driver name."""
    region: str
    """Region the scheduler matches."""
    labels: dict[str, str]
    """Labels the scheduler matches."""
    capacity: AgentCapacityOut
    """Capacity and current load."""
    last_heartbeat: AwareDatetime | None
    """When it was last heard from (UTC)."""
    metadata: dict[str, JsonValue]
    """Agent version, transports, lease holder, ..."""
    fencing_epoch: int
    """Highest lease epoch seen."""
    created_at: AwareDatetime
    """First registration."""

    @classmethod
    def of(cls, agent: AgentRecord) -> AgentOut:
        """Build from a stored agent."""
        return cls(
            agent_id=agent.agent_id,
            status=agent.status,
            platform=agent.platform,
            region=agent.region,
            labels=agent.labels,
            capacity=AgentCapacityOut(
                max_sessions=agent.capacity.max_sessions,
                current_sessions=agent.usage.sessions,
                max_cpu_m=agent.capacity.max_cpu_m,
                max_memory_mib=agent.capacity.max_memory_mib,
                cpu_m=agent.usage.cpu_m,
                memory_mib=agent.usage.memory_mib,
            ),
            last_heartbeat=agent.last_heartbeat,
            metadata=agent.metadata,
            fencing_epoch=agent.fencing_epoch,
            created_at=agent.created_at,
        )


class AgentTokenOut(ApiModel):
    """An agent token, without the token itself."""

    token_id: str
    """Public id; revoke with ``DELETE /api/v1/agent-tokens/{token_id}``."""
    agent_id: str
    """The agent it authenticates."""
    created_at: AwareDatetime
    """When issued."""
    revoked_at: AwareDatetime | None
    """When revoked; a revoked token is refused."""
    last_used_at: AwareDatetime | None
    """When an agent last connected with it."""

    @classmethod
    def of(cls, token: AgentToken) -> AgentTokenOut:
        """Build from a stored token."""
        return cls(
            token_id=token.token_id,
            agent_id=token.agent_id,
            created_at=token.created_at,
            revoked_at=token.revoked_at,
            last_used_at=token.last_used_at,
        )


class AgentTokenCreated(AgentTokenOut):
    """A new agent token: the only time the token is shown."""

    token: str
    """Give it to the agent as ``AGENT_TOKEN``; it cannot be shown again."""


class AgentTokenListQuery(ApiModel):
    """Filter of ``GET /api/v1/agent-tokens``."""

    agent_id: AgentId | None = None
    """Only this agent's tokens."""


class VncTokenOut(ApiModel):
    """A token for one VNC viewer socket: one session, one user, one use, 60 seconds."""

    token: str
    """Pass it as ``?token=`` to ``/vnc/{session_id}``; it is refused after one use."""
    expires_at: AwareDatetime
    """When it stops being accepted (UTC)."""
    url: str
    """The viewer socket's path with the token, relative to the control plane."""
