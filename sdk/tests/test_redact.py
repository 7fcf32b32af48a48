"""Credentials and session contents kept out of logs: the filter on made-up records.

The control plane's ``test_security.py`` checks what real connections log through it.
"""

from __future__ import annotations

import logging

import pytest
from websockets.frames import Frame, Opcode

from streamspace_sdk import redact
from streamspace_sdk.redact import REDACTED, TokenRedactor


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/vnc/s-1?token=abc.DEF_-1", f"/vnc/s-1?token={REDACTED}"),
        ("/vnc/s-1?x=1&token=abc&y=2", f"/vnc/s-1?x=1&token={REDACTED}&y=2"),
        ("/api/v1/agents/vnc/Zm9v_-x", f"/api/v1/agents/vnc/{REDACTED}"),
        (
            '"WebSocket /api/v1/agents/vnc/t0k" 403',
            f'"WebSocket /api/v1/agents/vnc/{REDACTED}" 403',
        ),
        ("Authorization: Bearer eyJ.x.y", f"Authorization: Bearer {REDACTED}"),
        ("/api/v1/sessions?state=running", "/api/v1/sessions?state=running"),
    ],
)
def test_redact(line: str, expected: str) -> None:
    assert redact.redact(line) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:s3cret@h/1?ssl_cert_reqs=none", "rediss://user:***@h/1?ssl_cert_reqs=none"),
        ("redis://h:6379?password=s3cret&db=2", "redis://h:6379?password=***&db=2"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact.redact_url(url) == shown


def _filtered(msg: str, *args: object) -> str:
    record = logging.LogRecord("websockets.client", logging.DEBUG, __file__, 1, msg, args, None)
    assert TokenRedactor().filter(record)
    return record.getMessage()


def test_credential_headers_lose_their_value() -> None:
    assert _filtered("> %s: %s", "Authorization", "Bearer agent-token") == (
        f"> Authorization: {REDACTED}"
    )
    assert _filtered("< %s: %s", "set-cookie", "sid=1") == f"< set-cookie: {REDACTED}"
    assert _filtered("> %s: %s", "Host", "cp:8000") == "> Host: cp:8000"


def test_frames_show_their_kind_type_and_size_only() -> None:
    secret = '{"type": "vnc.open", "stream_token": "s3cret"}'
    text = _filtered("> %s", Frame(Opcode.TEXT, secret.encode()))
    assert text == f"> TEXT vnc.open [{len(secret)} bytes, payload not logged]"
    assert _filtered("< %s", Frame(Opcode.BINARY, b"k")) == (
        "< BINARY [1 byte, payload not logged]"
    )
    assert "going away" in _filtered("< %s", Frame(Opcode.CLOSE, b"\x03\xe9going away"))


def test_install_adds_one_filter_per_logger() -> None:
    logger = logging.getLogger("test.redact.install")
    try:
        redact.install([logger.name])
        redact.install([logger.name])
        assert sum(isinstance(f, TokenRedactor) for f in logger.filters) == 1
    finally:
        for found in list(logger.filters):
            logger.removeFilter(found)
