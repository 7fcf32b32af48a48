"""Keep credentials and session contents out of logs.

Both the agent and the control plane log WebSocket activity they do not format
themselves: uvicorn logs the path and query of every socket it accepts (a viewer's
``/vnc/{id}?token=...``, an agent's ``/api/v1/agents/vnc/{stream_token}``), and at
``LOG_LEVEL=DEBUG`` the WebSocket library traces every handshake header (an agent's
``Authorization: Bearer`` token, a relay ticket) and every frame (``vnc.open`` carries a
stream token; VNC bytes carry what the user types). :class:`TokenRedactor` rewrites such
records before any handler sees them; :func:`install` puts it on the loggers that need it.
:func:`redact_url` hides the password of a URL that is shown in settings or errors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.frames import Frame, Opcode

__all__ = ["LOGGERS", "REDACTED", "TokenRedactor", "install", "redact", "redact_url"]

REDACTED = "[redacted]"

_PATTERNS = (
    re.compile(r"(?i)((?:^|[?&])token=)[^&\s\"']+"),
    re.compile(r"(/api/v1/agents/vnc/)[^\s\"'?/]+"),
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',]+"),
)
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_HEADER_FORMATS = frozenset({"< %s: %s", "> %s: %s"})
"""How the WebSocket library logs one header of a handshake it traces."""
_MESSAGE_TYPE = re.compile(r'^\s*\{\s*"type"\s*:\s*"([A-Za-z0-9._-]{1,64})"')


def redact(text: str) -> str:
    """Return ``text`` with token query values, stream tokens in paths and bearer
    credentials replaced by :data:`REDACTED`."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_url(url: str) -> str:
    """Return ``url`` with its password (in the user part or a ``password`` query
    parameter) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*/")))


class _FrameSummary:
    """What a traced frame shows instead of its payload."""

    def __init__(self, frame: Frame) -> None:
        self._frame = frame

    def __str__(self) -> str:
        frame = self._frame
        if frame.opcode in (Opcode.CLOSE, Opcode.PING, Opcode.PONG):
            return str(frame)  # a close code and reason, or a keepalive: nothing secret
        kind = ""
        if frame.opcode is Opcode.TEXT:
            found = _MESSAGE_TYPE.match(bytes(frame.data[:100]).decode(errors="replace"))
            kind = f" {found.group(1)}" if found else ""
        size = len(frame.data)
        return (
            f"{frame.opcode.name}{kind} [{size} byte{'' if size == 1 else 's'}, payload not logged]"
        )


class TokenRedactor(logging.Filter):
    """A filter that redacts tokens in a record's message and its string arguments (kept
    as arguments: uvicorn's access formatter unpacks them), the values of credential
    headers, and the payloads of traced WebSocket frames (only the kind, the message
    ``type`` and the size remain)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            args = tuple(_redact_arg(a) for a in record.args)
            if (
                record.msg in _HEADER_FORMATS
                and len(args) == 2
                and str(args[0]).lower() in _SECRET_HEADERS
            ):
                args = (args[0], REDACTED)
            record.args = args
        return True


def _redact_arg(arg: object) -> object:
    if isinstance(arg, str):
        return redact(arg)
    if isinstance(arg, Frame):
        return _FrameSummary(arg)
    return arg


LOGGERS = ("uvicorn.error", "uvicorn.access", "websockets.client")
"""Where WebSocket URLs, handshakes and frames are logged: uvicorn's loggers for sockets
a process serves, the WebSocket library's client logger for sockets it dials."""


def install(logger_names: Iterable[str] = LOGGERS) -> None:
    """Add a :class:`TokenRedactor` to each named logger that has none yet.

    Filters on a logger apply to records logged there, not to its children's: name the
    exact loggers, after whatever configures them (uvicorn configures its own on start).
    """
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactor) for f in logger.filters):
            logger.addFilter(TokenRedactor())
