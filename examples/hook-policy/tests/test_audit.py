"""The audit sink, loaded through the real plugin manager: one JSON line per record."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import hooks

from streamspace_sdk.hooks import AuditRecord


def audit(*records: AuditRecord) -> None:
    """Hand ``records`` to the sink as the control plane does after audited actions."""

    async def send() -> None:
        sink = hooks("audit-jsonl")
        for record in records:
            await sink.audit_event(record)

    asyncio.run(send())


def test_each_record_is_one_json_line(audit_file: Path) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    audit(
        AuditRecord(
            actor="alice",
            action="session.create",
            resource="session/s-1",
            detail={"template": "desktop"},
            at=at,
        ),
        AuditRecord(actor="anonymous", action="auth.login_failed", resource=""),
    )
    first, second = (json.loads(line) for line in audit_file.read_text().splitlines())
    assert first == {
        "actor": "alice",
        "action": "session.create",
        "resource": "session/s-1",
        "detail": {"template": "desktop"},
        "at": "2026-01-02T03:04:05Z",
    }
    assert (second["actor"], second["action"]) == ("anonymous", "auth.login_failed")
    assert os.stat(audit_file).st_mode & 0o777 == 0o600


def test_an_unwritable_file_is_logged_and_the_action_goes_on(
    audit_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit_file.mkdir()  # a directory where the file should be
    with caplog.at_level(logging.ERROR, logger="streamspace.hooks"):
        audit(AuditRecord(actor="a", action="x", resource=""))
    (logged,) = [r for r in caplog.records if r.name == "streamspace.hooks"]
    assert "audit_event" in logged.getMessage()
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], IsADirectoryError)


def test_without_a_file_the_sink_warns_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.delenv("AUDIT_LOG_FILE", raising=False)
    with caplog.at_level(logging.WARNING, logger="streamspace.example.audit"):
        audit(AuditRecord(actor="a", action="x", resource=""))
    assert "AUDIT_LOG_FILE is not set; dropping x" in caplog.text
    assert list(tmp_path.iterdir()) == []
