"""The agent ⇄ control-plane wire protocol: every message, and the one parser for them.

Text frames are JSON objects with a dotted ``type``; :data:`Frame` is the discriminated
union of every message and :func:`parse_frame` the only way either side reads one. Binary
frames carry VNC bytes of the multiplexed transport behind a 5-byte header
(:func:`encode_data` / :func:`decode_data`); the receiver grants the sender more bytes with
:class:`VncCredit`.

Fields unknown to this version are ignored (a peer may be a minor version newer); an
unknown ``type`` is a :class:`~streamspace_sdk.errors.ProtocolError` that the receiver
answers with an :class:`Error` frame and the connection stays up.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self, TypeAlias

from pydantic import AwareDatetime, BaseModel, Field, TypeAdapter, ValidationError, model_validator

from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import ProtocolError
from streamspace_sdk.platform import Action, Capacity, SessionSpec, SessionStatus, Usage

__all__ = [
    "AGENT_PATHS",
    "DATA_HEADER_SIZE",
    "DEDICATED_STREAM_PATH",
    "MAX_BINARY_PAYLOAD_BYTES",
    "MAX_TEXT_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "AgentHello",
    "AgentWelcome",
    "Command",
    "CommandAck",
    "CommandResult",
    "Error",
    "Frame",
    "Heartbeat",
    "SessionStatusReport",
    "Shutdown",
    "VncClose",
    "VncCredit",
    "VncOpen",
    "VncOpened",
    "decode_data",
    "dump_frame",
    "encode_data",
    "error_frame",
    "json_schema",
    "parse_frame",
]

PROTOCOL_VERSION = 1
"""Grows when a change would confuse an older peer; new optional fields do not change it."""

AGENT_PATHS = ("/api/v1/agents/connect", "/agent/ws", "/api/v1/agents/hub")
"""Where the control plane serves agents, one endpoint at each path. The agent appends the
first to a ``CONTROL_PLANE_URL`` that ends in none of them; ``/agent/ws`` is the path the
seed guide's Helm values use, and ``/api/v1/agents/hub`` the one its troubleshooting checks."""

DEDICATED_STREAM_PATH = "/api/v1/agents/vnc/{stream_token}"
"""Where an agent dials one ``ws-dedicated`` stream, beside the agent endpoint."""

MAX_TEXT_FRAME_BYTES = 1024 * 1024
"""Largest text frame accepted: a hello listing 10,000 sessions fits; a runaway peer does not."""

MAX_BINARY_PAYLOAD_BYTES = 256 * 1024
"""Largest VNC payload in one binary frame (a quarter of the default credit window)."""

_DATA_KIND = 0x01
_HEADER = struct.Struct(">BI")
DATA_HEADER_SIZE = _HEADER.size
"""Bytes before the payload of a binary frame: one kind byte, a big-endian u32 stream id."""

StreamId = Annotated[int, Field(ge=1, le=0xFFFFFFFF)]


def _now() -> datetime:
    return datetime.now(UTC)


class AgentHello(WireModel):
    """Agent → control plane, first frame on a new socket: who the agent is and what it runs."""

    type: Literal["agent.hello"] = "agent.hello"
    agent_id: str = Field(min_length=1, max_length=63)
    """The agent's id; must match the one its token was issued for."""
    platform: str = Field(min_length=1)
    """Platform driver name (``kubernetes``, ``docker``, ``process``)."""
    region: str = "default"
    """Region, matched against templates and requests."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Free labels the scheduler can match."""
    capacity: Capacity
    """What the agent may run in total."""
    usage: Usage = Field(default_factory=Usage)
    """What it runs now."""
    protocol_version: int = Field(default=PROTOCOL_VERSION, ge=1)
    """The protocol version the agent speaks."""
    agent_version: str = ""
    """Version of the agent software, for people."""
    transports: list[str] = Field(default_factory=list)
    """VNC transports the agent can use, preferred first."""
    instance_id: str = ""
    """Where the agent's sessions live (``Platform.instance_scope()``: a host, a host and
    state directory, a cluster). A process of the same scope replaces the old socket; one
    of another scope with no higher fencing epoch is refused while the first is alive or
    the agent's sessions live in the first one's scope."""
    lease_holder: str | None = None
    """Lease holder identity when HA is on."""
    fencing_epoch: int = Field(default=0, ge=0)
    """Lease epoch; the control plane refuses an epoch below the highest it has seen."""
    sessions: list[SessionStatus] = Field(default_factory=list)
    """Every session the platform reports, so the control plane can reconcile."""


class AgentWelcome(WireModel):
    """Control plane → agent: the registration is accepted."""

    type: Literal["agent.welcome"] = "agent.welcome"
    connection_id: str
    """Id of this connection, for logs on both sides."""
    heartbeat_interval_s: float = Field(gt=0)
    """Seconds between heartbeats the control plane expects."""
    protocol_version: int = Field(default=PROTOCOL_VERSION, ge=1)
    """The version both sides will speak."""
    server_time: AwareDatetime = Field(default_factory=_now)
    """The control plane's clock (UTC), to spot skew."""


class Heartbeat(WireModel):
    """Agent → control plane, every heartbeat interval."""

    type: Literal["agent.heartbeat"] = "agent.heartbeat"
    usage: Usage = Field(default_factory=Usage)
    """Capacity in use now."""
    sent_at: AwareDatetime = Field(default_factory=_now)
    """The agent's clock (UTC)."""


class Command(WireModel):
    """Control plane → agent: bring a session to a state. Idempotent on (session, generation)."""

    type: Literal["command"] = "command"
    command_id: str = Field(min_length=1)
    """Id of the outbox row; echoed in the ack and the result."""
    session_id: str = Field(min_length=1)
    """The session acted on."""
    generation: int = Field(ge=1)
    """The session's generation this command brings it to."""
    action: Action
    """``start``, ``stop``, ``hibernate`` or ``wake``."""
    spec: SessionSpec | None = None
    """The full session spec; required for ``start`` and ``wake``."""
    issued_at: AwareDatetime = Field(default_factory=_now)
    """When the control plane first issued it (UTC)."""

    @model_validator(mode="after")
    def _spec_matches(self) -> Self:
        if self.action in ("start", "wake") and self.spec is None:
            raise ValueError(f"a {self.action} command needs a spec")
        if self.spec is not None and (
            self.spec.session_id != self.session_id or self.spec.generation != self.generation
        ):
            raise ValueError("spec.session_id and spec.generation must match the command's")
        return self

    def result(
        self, status: SessionStatus | None = None, *, reason: str | None = None
    ) -> CommandResult:
        """Return the answer to this command: failed for ``reason`` if one is given, else
        done; ``status`` is the session as the platform saw it afterwards."""
        return CommandResult(
            command_id=self.command_id,
            session_id=self.session_id,
            generation=self.generation,
            ok=reason is None,
            reason=reason,
            status=status,
        )


class CommandAck(WireModel):
    """Agent → control plane: the command arrived and will be carried out."""

    type: Literal["command.ack"] = "command.ack"
    command_id: str = Field(min_length=1)
    """The command acknowledged."""


class CommandResult(WireModel):
    """Agent → control plane: the command finished, well or not."""

    type: Literal["command.result"] = "command.result"
    command_id: str = Field(min_length=1)
    """The command this answers."""
    session_id: str = Field(min_length=1)
    """The session acted on."""
    generation: int = Field(ge=1)
    """The generation the command carried."""
    ok: bool
    """Whether the session reached the state asked for."""
    reason: str | None = None
    """Why not, for people; required when ``ok`` is false."""
    status: SessionStatus | None = None
    """The session as the platform saw it afterwards."""

    @model_validator(mode="after")
    def _reason_on_error(self) -> Self:
        if not self.ok and not self.reason:
            raise ValueError("a failed result needs a reason")
        return self


class SessionStatusReport(WireModel):
    """Agent → control plane: a session changed (state, detail, where its VNC answers)."""

    type: Literal["session.status"] = "session.status"
    status: SessionStatus
    """What the platform observes now."""


class VncOpen(WireModel):
    """Control plane → agent: a viewer wants the session's VNC; open a stream."""

    type: Literal["vnc.open"] = "vnc.open"
    stream_id: StreamId
    """Id of the stream, chosen by the control plane, unique on this connection."""
    session_id: str = Field(min_length=1)
    """Session whose VNC server to connect to."""
    transport: str = "ws-mux"
    """Transport to carry the bytes."""
    window_bytes: int = Field(default=256 * 1024, ge=1024)
    """Bytes the agent may send before it needs credit."""
    stream_token: str | None = None
    """For ``ws-dedicated``: the token to present on the new socket."""


class VncOpened(WireModel):
    """Agent → control plane: the stream is connected to the VNC server."""

    type: Literal["vnc.opened"] = "vnc.opened"
    stream_id: StreamId
    """The stream now open."""
    window_bytes: int = Field(default=256 * 1024, ge=1024)
    """Bytes the control plane may send before it needs credit."""


class VncClose(WireModel):
    """Either way: the stream is closed (or could not be opened)."""

    type: Literal["vnc.close"] = "vnc.close"
    stream_id: StreamId
    """The stream closed."""
    reason: str = ""
    """Why, for people; empty on a normal close."""


class VncCredit(WireModel):
    """Either way: the receiver consumed bytes; the sender may send that many more."""

    type: Literal["vnc.credit"] = "vnc.credit"
    stream_id: StreamId
    """The stream credited."""
    credit_bytes: int = Field(ge=1)
    """Bytes added to the sender's window."""


class Error(WireModel):
    """Either way: a frame was refused; the connection stays up unless a close follows."""

    type: Literal["error"] = "error"
    code: str
    """Machine-readable reason (``not_json``, ``unknown_type``, ``invalid``, ...)."""
    message: str
    """The sentence a person reads."""
    ref: str | None = None
    """What it answers: a command id, a frame type, or nothing."""


class Shutdown(WireModel):
    """Either way: the sender is going away on purpose (deploy, SIGTERM)."""

    type: Literal["shutdown"] = "shutdown"
    reason: str = ""
    """Why, for logs."""
    reconnect_after_s: float | None = Field(default=None, ge=0)
    """Hint from the control plane: reconnect after this many seconds."""


Frame: TypeAlias = Annotated[
    AgentHello
    | AgentWelcome
    | Heartbeat
    | Command
    | CommandAck
    | CommandResult
    | SessionStatusReport
    | VncOpen
    | VncOpened
    | VncClose
    | VncCredit
    | Error
    | Shutdown,
    Field(discriminator="type"),
]
"""Any text frame."""

_ADAPTER: TypeAdapter[Frame] = TypeAdapter(Frame)
FRAME_TYPES: dict[str, type[WireModel]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        AgentHello,
        AgentWelcome,
        Heartbeat,
        Command,
        CommandAck,
        CommandResult,
        SessionStatusReport,
        VncOpen,
        VncOpened,
        VncClose,
        VncCredit,
        Error,
        Shutdown,
    )
}


def parse_frame(data: str | bytes) -> Frame:
    """Parse one text frame.

    A frame that ``dump_frame`` could not write back as it came is ``invalid`` too: one
    holding a lone UTF-16 surrogate, ``NaN``, an infinity (or a float too large, read as
    one), or nesting deeper than 128 levels.

    A text holding a lone surrogate itself (not escaped) is ``not_utf8``, as its bytes
    would be.

    Raises:
        ProtocolError: with ``code`` one of ``too_large``, ``not_utf8``, ``not_json``,
            ``not_object``, ``missing_type``, ``unknown_type``, ``invalid``, and a reason
            that says what was wrong where, in a few hundred characters at most.
    """
    size = len(data)
    if isinstance(data, str) and size <= MAX_TEXT_FRAME_BYTES < 4 * size:
        size = len(data.encode("utf-8", "surrogatepass"))  # the limit is in bytes
    if size > MAX_TEXT_FRAME_BYTES:
        raise ProtocolError("too_large", f"frame of {size} bytes exceeds {MAX_TEXT_FRAME_BYTES}")
    if isinstance(data, str) and _LONE_SURROGATE.search(data):
        # Not text a socket can carry (escaped, "\ud800", it is JSON's: checked below).
        raise ProtocolError("not_utf8", "frame holds a lone UTF-16 surrogate, not UTF-8 text")
    try:
        return _writable(_ADAPTER.validate_json(data), data)
    except ValidationError:
        pass  # slow path below finds a readable reason
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("not_utf8", f"frame is not UTF-8 text: {exc.reason}") from None
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("not_json", f"frame is not JSON: {exc}") from None
    except ValueError:  # int() refuses literals of more than sys.get_int_max_str_digits()
        raise ProtocolError(
            "invalid", f"frame holds an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError("not_object", f"frame must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind is None:
        raise ProtocolError("missing_type", "frame has no 'type' field")
    if not isinstance(kind, str) or kind not in FRAME_TYPES:
        known = ", ".join(sorted(FRAME_TYPES))
        raise ProtocolError("unknown_type", f"unknown frame type {_short(kind)}; known: {known}")
    try:
        frame = _ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise ProtocolError("invalid", f"bad {kind!r} frame: {_describe(exc)}") from None
    return _writable(frame, data)


_MAX_DEPTH = 128
"""Deepest nesting of objects and lists a frame may have (no frame needs a dozen levels;
pydantic validates a little deeper than it can serialise, near 255)."""

_UNWRITABLE_HINTS = r"\\u[dD][89a-fA-F]|NaN|Infinity|[:,\[]\s*-?[0-9.]+[eE]|[0-9]{309}"
"""What precedes a surrogate escape, a non-finite number, or an exponent (which may overflow)."""
_MAYBE_UNWRITABLE = re.compile(_UNWRITABLE_HINTS)
_MAYBE_UNWRITABLE_BYTES = re.compile(_UNWRITABLE_HINTS.encode())
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _writable(frame: Frame, data: str | bytes) -> Frame:
    """Refuse a frame that ``dump_frame`` cannot write back as it came.

    That is one holding a lone UTF-16 surrogate (in a key too), a number JSON cannot
    carry (``NaN``, ``Infinity``, or a float too large, read as infinity), or nesting
    deeper than :data:`_MAX_DEPTH`. The text is searched first for what may lead to
    each, so an ordinary frame is not walked.
    """
    if isinstance(data, str):
        brackets = data.count("[") + data.count("{")
        maybe = _MAYBE_UNWRITABLE.search(data) is not None
    else:
        brackets = data.count(b"[") + data.count(b"{")
        maybe = _MAYBE_UNWRITABLE_BYTES.search(data) is not None
    if not maybe and brackets <= _MAX_DEPTH:
        return frame
    problem = _unwritable(frame)
    if problem is not None:
        raise ProtocolError("invalid", f"bad {frame.type!r} frame: {problem}")
    return frame


def _unwritable(frame: Frame) -> str | None:
    """Say what in ``frame`` JSON cannot carry as it is, or return ``None``."""
    stack: list[tuple[Any, int]] = [(frame, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return f"nested deeper than {_MAX_DEPTH} levels"
        if isinstance(value, BaseModel):
            stack.extend((getattr(value, name), depth + 1) for name in type(value).model_fields)
        elif isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return "a string holds a lone UTF-16 surrogate"
        elif isinstance(value, float) and not math.isfinite(value):
            return "a number is not finite (NaN, Infinity, or too large for a float)"
    return None


def dump_frame(frame: WireModel) -> str:
    """Serialise a frame to the JSON text sent on the socket."""
    return frame.model_dump_json()


def error_frame(exc: ProtocolError, ref: str | None = None) -> Error:
    """Return the ``error`` frame that answers a frame that raised ``exc``."""
    return Error(code=exc.code, message=exc.reason, ref=ref)


def encode_data(stream_id: int, payload: bytes | bytearray | memoryview) -> bytes:
    """Return the binary frame that carries ``payload`` on stream ``stream_id``."""
    if not 1 <= stream_id <= 0xFFFFFFFF:
        raise ProtocolError("bad_stream", f"stream id {stream_id} is outside 1..2**32-1")
    if len(payload) > MAX_BINARY_PAYLOAD_BYTES:
        raise ProtocolError(
            "too_large", f"payload of {len(payload)} bytes exceeds {MAX_BINARY_PAYLOAD_BYTES}"
        )
    return _HEADER.pack(_DATA_KIND, stream_id) + payload


def decode_data(frame: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """Split a binary frame into its stream id and payload (a view, not a copy).

    Raises:
        ProtocolError: ``truncated``, ``bad_kind``, ``bad_stream`` or ``too_large``.
    """
    view = memoryview(frame)
    if len(view) < DATA_HEADER_SIZE:
        raise ProtocolError(
            "truncated",
            f"binary frame of {len(view)} bytes is shorter than its {DATA_HEADER_SIZE}-byte header",
        )
    kind, stream_id = _HEADER.unpack_from(view)
    if kind != _DATA_KIND:
        raise ProtocolError("bad_kind", f"binary frame kind {kind:#04x} is not data (0x01)")
    if stream_id == 0:
        raise ProtocolError("bad_stream", "binary frame names stream 0, which is reserved")
    payload = view[DATA_HEADER_SIZE:]
    if len(payload) > MAX_BINARY_PAYLOAD_BYTES:
        raise ProtocolError(
            "too_large", f"payload of {len(payload)} bytes exceeds {MAX_BINARY_PAYLOAD_BYTES}"
        )
    return stream_id, payload


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of :data:`Frame`, as committed in ``sdk/schema/protocol.json``."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "StreamSpace agent protocol frame"
    schema["x-protocol-version"] = PROTOCOL_VERSION
    return schema


_MAX_LISTED_ERRORS = 5
_MAX_PART_CHARS = 120


def _short(value: object) -> str:
    """``repr(value)``, cut to a length an error frame can carry whatever the peer sent."""
    text = repr(value)
    if len(text) <= _MAX_PART_CHARS:
        return text
    return f"{text[: _MAX_PART_CHARS - 20]}...({len(text)} characters)"


def _describe(exc: ValidationError) -> str:
    """The first few errors, each cut short: a reason never grows with the frame."""
    parts = []
    errors = exc.errors(include_url=False, include_input=False)
    for err in errors[:_MAX_LISTED_ERRORS]:
        loc = ".".join(str(p) for p in err["loc"][1:]) or "frame"
        if len(loc) > _MAX_PART_CHARS:
            loc = f"{loc[: _MAX_PART_CHARS // 2]}...{loc[-_MAX_PART_CHARS // 2 :]}"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "recursion_loop":  # older pydantic stops deep nesting itself
            msg = f"nested deeper than {_MAX_DEPTH} levels"
        if len(msg) > _MAX_PART_CHARS:
            msg = f"{msg[:_MAX_PART_CHARS]}..."
        parts.append(f"{loc}: {msg}")
    if len(errors) > _MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_LISTED_ERRORS} more")
    return "; ".join(parts)
