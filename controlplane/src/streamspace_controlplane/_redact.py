"""Keep one-time secrets out of uvicorn's logs.

uvicorn logs the path and query of every WebSocket it accepts or refuses: a viewer's
``/vnc/{id}?token=...`` and an agent's ``/api/v1/agents/vnc/{stream_token}`` would put
live tokens in the logs. :class:`TokenRedactor` rewrites those records before any handler
sees them.
"""

from __future__ import annotations

import logging
import re

__all__ = ["REDACTED", "TokenRedactor", "install"]

REDACTED = "[redacted]"

_PATTERNS = (
    re.compile(r"(?i)((?:^|[?&])token=)[^&\s\"']+"),
    re.compile(r"(/api/v1/agents/vnc/)[^\s\"'?/]+"),
)
_LOGGERS = ("uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    """Return ``text`` with token query values and stream tokens in paths replaced."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class TokenRedactor(logging.Filter):
    """A filter that redacts tokens in a record's message and its string arguments (kept
    as arguments: uvicorn's access formatter unpacks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install() -> None:
    """Add the filter to uvicorn's loggers (once; after uvicorn configured its logging)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactor) for f in logger.filters):
            logger.addFilter(TokenRedactor())
