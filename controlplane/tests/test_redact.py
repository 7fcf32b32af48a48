"""Tokens in WebSocket URLs never reach the logs that ``serve`` configures."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from agentsim import fast_settings

from streamspace_controlplane.app import build_control_plane
from streamspace_controlplane.cli import server_config
from streamspace_controlplane.store.base import Store
from streamspace_sdk.redact import REDACTED


def test_serve_redacts_uvicorn_websocket_lines(
    sqlite_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn logs each WebSocket's path and query as it accepts or refuses it."""
    server_config(build_control_plane(fast_settings(tmp_path / "home"), store=sqlite_store))
    secret = "s3cr3t-token-value"
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn.access")]
    for logger in loggers:  # they do not propagate to the root, where caplog listens
        logger.addHandler(caplog.handler)
    try:
        for path in (f"/vnc/s-1?token={secret}", f"/api/v1/agents/vnc/{secret}"):
            loggers[0].info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", path)
            loggers[1].info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", path, "1.1", 403)
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert all(REDACTED in m for m in messages)
    assert secret not in caplog.text
