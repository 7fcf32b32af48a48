"""The control plane's records: what the store keeps and the services hand around."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

from streamspace_sdk.platform import Capacity, Resources, SessionState, Usage

__all__ = [
    "ACTIVE_STATES",
    "AgentRecord",
    "AgentStatus",
    "AgentToken",
    "AuditEntry",
    "CommandRecord",
    "CommandStatus",
    "DesiredState",
    "Record",
    "Role",
    "Session",
    "SessionEventRecord",
    "Template",
    "TemplateSpec",
    "User",
    "utcnow",
]

Role = Literal["admin", "user"]
DesiredState = Literal["running", "hibernated", "stopped"]
AgentStatus = Literal["online", "offline"]
CommandStatus = Literal["pending", "sent", "acked", "completed", "failed", "expired"]

ACTIVE_STATES: frozenset[str] = frozenset(
    {"pending", "scheduled", "starting", "running", "stopping", "hibernated", "lost"}
)
"""States that count against a user's quota and an agent's capacity (all but stopped/failed)."""


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Record(BaseModel):
    """Base of stored records: validated, copied with ``model_copy(update=...)``."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class User(Record):
    """A person who logs in."""

    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    """Login name, unique."""
    role: Role = "user"
    """``admin`` manages agents, users and templates; ``user`` runs sessions."""
    disabled: bool = False
    """A disabled user cannot log in, use a token or view a desktop; their sessions keep
    running. Off by default, so users made before the flag existed stay as they were."""
    token_epoch: int = Field(default=0, ge=0)
    """Grows by one whenever the user's tokens are cut off (disabled, new password). A token
    carries the epoch it was issued at and is refused once they differ; 0 matches tokens
    issued before there were epochs."""
    password_hash: str = Field(default="", repr=False, exclude=True)
    """argon2 hash; never serialised."""
    created_at: AwareDatetime = Field(default_factory=utcnow)
    """When the user was created."""


class AgentToken(Record):
    """A credential an agent presents; only its hash is kept."""

    token_id: str
    """Public id of the token (shown in listings, used to revoke)."""
    agent_id: str
    """The agent it authenticates."""
    token_hash: str = Field(repr=False, exclude=True)
    """SHA-256 of the token (tokens are 256 random bits, so a fast hash is enough)."""
    created_at: AwareDatetime = Field(default_factory=utcnow)
    """When it was issued."""
    revoked_at: AwareDatetime | None = None
    """When it was revoked; a revoked token is refused."""
    last_used_at: AwareDatetime | None = None
    """When an agent last connected with it."""


class AgentRecord(Record):
    """An agent as the seed's ``agents`` table describes it."""

    agent_id: str
    """Unique id, e.g. ``k8s-prod-us-east-1``."""
    platform: str
    """Platform driver name."""
    region: str = "default"
    """Region the scheduler matches."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels the scheduler matches."""
    status: AgentStatus = "offline"
    """``online`` while a registered socket is heartbeating."""
    capacity: Capacity = Field(default_factory=lambda: Capacity(max_sessions=0))
    """What it may run."""
    usage: Usage = Field(default_factory=Usage)
    """What it runs, as last reported."""
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    """Agent version, transports, lease holder, ..."""
    websocket_conn_id: str | None = None
    """Id of the connection that registered last; only it may update or unregister."""
    last_heartbeat: AwareDatetime | None = None
    """When it was last heard from."""
    fencing_epoch: int = Field(default=0, ge=0)
    """Highest lease epoch seen; a registration with a lower one is refused."""
    created_at: AwareDatetime = Field(default_factory=utcnow)
    """First registration."""


class TemplateSpec(Record):
    """The editable fields of a template: what the API takes and the store keeps."""

    display_name: str = Field(default="", max_length=200)
    """Shown in the catalog."""
    description: str = Field(default="", max_length=2000)
    """Shown in the catalog."""
    image: str | None = None
    """Container or VM image (Docker, Kubernetes)."""
    command: list[str] = Field(default_factory=list)
    """Program and arguments (``process`` platform; overrides the image's command)."""
    vnc_port: int = Field(default=5900, ge=1, le=65535)
    """Port of the VNC server inside the session."""
    resources: Resources = Field(default_factory=Resources)
    """CPU and memory requests and limits."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment of the session."""
    persistent_home: bool = False
    """Keep the user's home across sessions."""
    platform: str | None = None
    """Only agents of this platform may run it."""
    region: str | None = None
    """Only agents of this region may run it."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Agents must carry all these labels."""
    platform_options: dict[str, JsonValue] = Field(default_factory=dict)
    """Passed to the platform as is (node selector, tolerations, ...)."""


class Template(TemplateSpec):
    """What a session is made from."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    """Unique name, DNS-label style."""
    created_at: AwareDatetime = Field(default_factory=utcnow)
    """When created."""
    updated_at: AwareDatetime = Field(default_factory=utcnow)
    """When last changed."""


class Session(Record):
    """A user's session: what they want (``desired_state``) and what the agent reports."""

    id: str
    """Stable id, ``s-`` and 16 hex digits."""
    user: str
    """Owner."""
    template: str
    """Template name."""
    template_snapshot: Template
    """The template as it was when the session was created."""
    desired_state: DesiredState = "running"
    """What the user asked for."""
    state: SessionState = "pending"
    """What is true, as far as the control plane knows."""
    generation: int = Field(default=1, ge=1)
    """Grows by one at every change of desired state; commands carry it."""
    agent_id: str | None = None
    """The agent it is placed on."""
    platform: str | None = None
    """That agent's platform."""
    platform_metadata: dict[str, JsonValue] = Field(default_factory=dict)
    """What the platform reported (container id, pod name, VNC endpoint)."""
    reason: str = ""
    """Why it is in its state, for people (e.g. why it is still pending)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Placement constraints from the request, on top of the template's."""
    region: str | None = None
    """Region asked for in the request."""
    forget: bool = False
    """Delete the row once the session has stopped (``DELETE /api/v1/sessions/{id}``)."""
    created_at: AwareDatetime = Field(default_factory=utcnow)
    """When created."""
    updated_at: AwareDatetime = Field(default_factory=utcnow)
    """When last changed."""


class CommandRecord(Record):
    """A row of the ``agent_commands`` outbox."""

    command_id: str
    """Id sent to the agent and echoed in its ack and result."""
    agent_id: str
    """Agent it is for."""
    session_id: str
    """Session it acts on."""
    generation: int = Field(ge=1)
    """Session generation it brings about."""
    command_type: str
    """``start``, ``stop``, ``hibernate`` or ``wake``."""
    command_data: dict[str, JsonValue]
    """The ``command`` frame as sent (JSON)."""
    status: CommandStatus = "pending"
    """Outbox state."""
    result: dict[str, JsonValue] | None = None
    """The agent's ``command.result`` (JSON), once completed or failed."""
    attempts: int = Field(default=0, ge=0)
    """How many times it was sent."""
    created_at: AwareDatetime = Field(default_factory=utcnow)
    """When enqueued."""
    sent_at: AwareDatetime | None = None
    """When last sent."""
    acked_at: AwareDatetime | None = None
    """When acknowledged."""
    completed_at: AwareDatetime | None = None
    """When completed, failed or expired."""
    next_attempt_at: AwareDatetime | None = None
    """When it is due to be (re)sent; ``None`` means as soon as the agent is connected."""


class SessionEventRecord(Record):
    """One state change or progress message of a session."""

    id: int = 0
    """Increasing id (the SSE event id); 0 until stored."""
    session_id: str
    """The session."""
    state: SessionState
    """State after the event."""
    previous_state: SessionState | None = None
    """State before, if it changed."""
    detail: str = ""
    """Progress message or reason."""
    at: AwareDatetime = Field(default_factory=utcnow)
    """When it happened."""


class AuditEntry(Record):
    """Who did what to what."""

    id: int = 0
    """Increasing id; 0 until stored."""
    actor: str
    """Username, ``agent:<id>`` or ``system``."""
    action: str
    """Verb, e.g. ``session.create``, ``user.delete``, ``login.failed``."""
    resource: str
    """What was acted on, e.g. ``session/s-1234``."""
    detail: dict[str, JsonValue] = Field(default_factory=dict)
    """Extra facts."""
    at: AwareDatetime = Field(default_factory=utcnow)
    """When."""
