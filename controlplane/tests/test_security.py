"""Security regression tests: one per class of vulnerability this kind of system has had.

Each test names the class it guards against in its docstring and says which older tests
already cover part of it (those are not repeated here).
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from apikit import isolate
from test_vnc import (
    AGENT_ID,
    RFB_VERSION,
    TRANSPORTS,
    _refused,
    _ws_io,
    environment,
    framebuffer,
    rfb_handshake,
)

from streamspace_controlplane import _redact
from streamspace_controlplane.store.base import Store
from streamspace_sdk import AgentSettings
from streamspace_sdk.protocol import VncOpen

FRAGMENT = 12
"""Characters of a secret that count as leaked when found anywhere: 12 random base64url
characters are 72 bits, never a coincidence, and catch a token cut short by an elision."""

_QUIET = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets")


def leaks(secret: str, text: str, size: int = FRAGMENT) -> list[str]:
    """Return the fragments of ``secret`` (``size`` characters long) found in ``text``."""
    return [
        secret[i : i + size] for i in range(len(secret) - size + 1) if secret[i : i + size] in text
    ]


class _Capture(logging.Handler):
    """Keeps every record once (a record reaches the root and uvicorn's loggers alike)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.records: list[logging.LogRecord] = []
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) not in self._seen:  # kept in ``records``, so ids are never reused
            self._seen.add(id(record))
            self.records.append(record)

    def text(self, *, excluding: tuple[str, ...] = ()) -> str:
        """Every record as a handler would print it, but those of loggers ``excluding``."""
        return "\n".join(
            self.format(r)
            for r in self.records
            if not any(r.name == n or r.name.startswith(n + ".") for n in excluding)
        )


@pytest.fixture
def debug_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Capture]:
    """Every log record of the process at DEBUG, as with ``LOG_LEVEL=DEBUG``.

    uvicorn's loggers do not propagate to the root, so the handler goes on each; the
    servers the tests start set uvicorn's levels when they start, so that is patched to
    set DEBUG, as ``serve`` does with ``LOG_LEVEL=DEBUG``. The filters ``serve`` installs
    are installed too.
    """
    capture = _Capture()
    configure = uvicorn.Config.configure_logging

    def configure_debug(self: uvicorn.Config) -> None:
        configure(self)
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.DEBUG)

    monkeypatch.setattr(uvicorn.Config, "configure_logging", configure_debug)
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in _QUIET)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
    _redact.install()
    try:
        yield capture
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(capture)
            logger.setLevel(level)


CLIENT_LOGGERS = ("test.viewer", "httpx", "httpcore")
"""The browser's and the REST client's loggers: the test's side, not the product's."""


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tokens_and_what_the_user_types_never_reach_the_logs(
    sqlite_store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: _Capture,
    transport: str,
) -> None:
    """Token leakage through logs (access logs and DEBUG wire traces), and session
    contents (keystrokes, clipboard) recorded in logs.

    With every logger at DEBUG, a viewer connects on a VNC token (a real agent and Xvnc,
    each transport), pastes a clipboard text into the desktop, and the used token is then
    presented again and refused. No fragment of the VNC token, the ``ws-dedicated``
    stream token, the agent token, the user's JWT or the clipboard text may appear in
    any record of the control plane or the agent. ``test_redact.py`` checks the filter
    on made-up uvicorn lines; this checks what real connections log.
    """
    isolate(monkeypatch)
    for name in AgentSettings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    viewer_log = logging.getLogger("test.viewer")
    clipboard = "correct-horse-battery-staple-" + secrets.token_hex(8)
    async with environment(sqlite_store, tmp_path, transport=transport) as env:
        opened: list[VncOpen] = []
        real = env.agent.transport.open_stream

        async def spy(link: Any, request: VncOpen) -> Any:
            opened.append(request)
            return await real(link, request)

        monkeypatch.setattr(env.agent.transport, "open_stream", spy)
        token = await env.token()
        async with env.viewer(token, logger=viewer_log) as ws:
            io = _ws_io(ws)
            banner, server_init = await rfb_handshake(io)
            assert banner == RFB_VERSION
            text = clipboard.encode()
            await io.write(struct.pack(">B3xI", 6, len(text)) + text)  # ClientCutText
            # The update asked for after it comes back once the text went through.
            assert any(await framebuffer(io, server_init))
        assert await _refused(env, token, logger=viewer_log) == 403
        kept = {
            "VNC token": token,
            # ssa_<token id>_<secret>: the id is public (the API lists it), the rest not.
            "agent token": (await env.harness.token(AGENT_ID)).split("_", 2)[2],
            "user JWT": env.alice["Authorization"].removeprefix("Bearer "),
            "clipboard": clipboard,
        }
        # As a hex dump shows it; 8 bytes, so that no other bytes match by chance.
        hex_dump = " ".join(f"{b:02x}" for b in clipboard.encode())
    assert [r.transport for r in opened] == [transport]
    if transport == "ws-dedicated":
        assert opened[0].stream_token
        kept["stream token"] = opened[0].stream_token
    logged = debug_logs.text(excluding=CLIENT_LOGGERS)
    assert "WebSocket /vnc/" in logged  # uvicorn's lines were captured
    assert "< BINARY" in logged  # and the wire traces
    lines = [
        line
        for line in logged.splitlines()
        if any(leaks(s, line) for s in kept.values()) or leaks(hex_dump, line, 23)
    ]
    assert not lines, "\n".join(lines[:20])
