"""The ``audit-jsonl`` hook plugin: every audit record as one JSON line in a file.

Load it on the control plane, which calls ``audit_event`` after each audited action
(log-ins, sessions created and deleted, templates and users changed, refusals). Set
``AUDIT_LOG_FILE`` to the file; a log shipper (Fluent Bit, Vector, a SIEM agent) can
follow it. Each record is one line such as::

    {
        "actor": "alice",
        "action": "session.create",
        "resource": "session/s-...",
        "detail": {...},
        "at": "2026-01-01T12:00:00Z",
    }

Each line is written with one ``write`` on a file opened with ``O_APPEND``, so lines from
several control-plane processes sharing the file never interleave. The write happens in a
thread, so a slow disk does not stall the control plane's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from streamspace_sdk import hookimpl
from streamspace_sdk.hooks import AuditRecord
from streamspace_sdk.settings import StreamSpaceSettings, load_settings

__all__ = ["AuditSettings", "append_line", "audit_event"]

logger = logging.getLogger("streamspace.example.audit")


class AuditSettings(StreamSpaceSettings):
    """Where the audit lines go; read from the environment."""

    audit_log_file: Path | None = None
    """``AUDIT_LOG_FILE``: the JSON-lines file, created (mode 0600) if missing. Unset turns
    the sink off, with a warning at each record."""


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` in one write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@hookimpl
async def audit_event(record: AuditRecord) -> None:
    """Write ``record`` as a JSON line to ``AUDIT_LOG_FILE``.

    An error (the file cannot be written) propagates: the SDK logs it and goes on, so a
    broken sink never fails the action being audited.
    """
    settings = load_settings(AuditSettings)  # microseconds; a changed setting applies at once
    if settings.audit_log_file is None:
        logger.warning("audit-jsonl: AUDIT_LOG_FILE is not set; dropping %s", record.action)
        return
    await asyncio.to_thread(append_line, settings.audit_log_file, record.model_dump_json())
