"""Keep one-time secrets and session contents out of the logs ``serve`` writes.

uvicorn logs the path and query of every WebSocket it accepts or refuses: a viewer's
``/vnc/{id}?token=...`` and an agent's ``/api/v1/agents/vnc/{stream_token}`` would put
live tokens in the logs. At ``LOG_LEVEL=DEBUG`` the WebSocket library also traces every
handshake header (an agent's ``Authorization: Bearer`` token, a relay ticket) and every
frame (``vnc.open`` carries a stream token, and VNC bytes carry what the user types), on
uvicorn's logger for the server side and on ``websockets.client`` for the sockets this
process dials. :class:`TokenRedactor` rewrites those records before any handler sees them:
tokens become ``[redacted]``, credential headers lose their value, and a frame shows only
its kind, its message ``type`` and its size.
"""

from __future__ import annotations

import logging
import re

from websockets.frames import Frame, Opcode

__all__ = ["REDACTED", "TokenRedactor", "install", "redact"]

REDACTED = "[redacted]"

_PATTERNS = (
    re.compile(r"(?i)((?:^|[?&])token=)[^&\s\"']+"),
    re.compile(r"(/api/v1/agents/vnc/)[^\s\"'?/]+"),
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',]+"),
)
_LOGGERS = ("uvicorn.error", "uvicorn.access", "websockets.client")
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_HEADER_FORMATS = frozenset({"< %s: %s", "> %s: %s"})
"""How the WebSocket library logs one header of a handshake it traces."""
_MESSAGE_TYPE = re.compile(r'^\s*\{\s*"type"\s*:\s*"([A-Za-z0-9._-]{1,64})"')


def redact(text: str) -> str:
    """Return ``text`` with token query values, stream tokens in paths and bearer
    credentials replaced."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


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
    headers and the payloads of traced WebSocket frames."""

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


def install() -> None:
    """Add the filter to uvicorn's loggers and to the WebSocket client's (once; after
    uvicorn configured its logging)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactor) for f in logger.filters):
            logger.addFilter(TokenRedactor())
