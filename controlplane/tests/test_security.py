"""Security regression tests: one per class of vulnerability this kind of system has had.

Each test names the class it guards against in its docstring and says which older tests
already cover part of it (those are not repeated here).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import secrets
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import apikit
import httpx
import pytest
import pytest_asyncio
import uvicorn
from agentsim import (
    WAIT_S,
    AgentSim,
    Harness,
    Refused,
    fast_settings,
    serve_control_plane,
)
from apikit import ADMIN, bearer, isolate
from pydantic import SecretStr
from starlette.routing import WebSocketRoute
from test_vnc import AGENT_ID, TRANSPORTS, _refused, environment
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from streamspace_controlplane import auth
from streamspace_controlplane.app import create_app
from streamspace_controlplane.cli import main as controlplane_main
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.hub.base import Tickets
from streamspace_controlplane.hub.memory import MemoryHub
from streamspace_controlplane.hub.redis import RedisHub
from streamspace_controlplane.models import Session, User, utcnow
from streamspace_controlplane.services import sessions as session_service
from streamspace_controlplane.services import users as user_service
from streamspace_controlplane.services import vnc as vnc_service
from streamspace_controlplane.services.vnc import VncTokens
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store.base import Store
from streamspace_controlplane.store.postgres import PostgresStore
from streamspace_sdk import AgentSettings, redact
from streamspace_sdk.cli import main as agent_main
from streamspace_sdk.errors import ConfigError
from streamspace_sdk.hooks import Principal
from streamspace_sdk.platform import SessionStatus
from streamspace_sdk.protocol import (
    AGENT_PATHS,
    DEDICATED_STREAM_PATH,
    CommandAck,
    CommandResult,
    SessionStatusReport,
    VncClose,
    VncOpen,
    VncOpened,
    encode_data,
)
from streamspace_sdk.settings import PluginSettings, load_settings
from streamspace_sdk.testing import RFB_VERSION, RfbStream, read_framebuffer, rfb_handshake

FRAGMENT = 12
"""Characters of a secret that count as leaked when found anywhere: 12 random base64url
characters are 72 bits, never a coincidence, and catch a token cut short by an elision."""

_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets")


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
        for name in _SERVER_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)

    monkeypatch.setattr(uvicorn.Config, "configure_logging", configure_debug)
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in _SERVER_LOGGERS)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
    redact.install()
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
            rfb = RfbStream.websocket(ws)
            banner, init = await rfb_handshake(rfb)
            assert banner == RFB_VERSION
            text = clipboard.encode()
            await rfb.write(struct.pack(">B3xI", 6, len(text)) + text)  # ClientCutText
            # The update is asked for after the text, so once it is back the text went
            # through. (The screen may still be black: xterm may not have drawn yet.)
            await read_framebuffer(rfb, init)
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


# -- WebSocket upgrades ----------------------------------------------------------------


ALICE = Principal(username="alice", role="user")


@dataclass
class Stack:
    """A served control plane, agent ``agent-a`` (simulated, ``ws-mux``) with two running
    sessions of alice, and the credentials of each kind."""

    harness: Harness
    sim: AgentSim
    session: Session
    other: Session

    @property
    def cp(self) -> ControlPlane:
        return self.harness.cp

    def url(self, path: str) -> str:
        return self.harness.url + path

    async def vnc_token(self, session: Session | None = None, user: Principal = ALICE) -> str:
        token, _ = await vnc_service.issue_token(self.cp, user, (session or self.session).id)
        return token

    async def relay_ticket(self, session: Session | None = None) -> str:
        return await vnc_service.issue_relay_ticket(self.cp, session or self.session, "alice")

    def opens(self, sim: AgentSim | None = None) -> list[VncOpen]:
        """The ``vnc.open`` frames ``sim`` (agent A by default) was sent."""
        return [f for f in (sim or self.sim).frames if isinstance(f, VncOpen)]

    async def answer_open(self, seen: int) -> VncOpen:
        """Wait for the ``vnc.open`` after the first ``seen``; refuse it, so the viewer's
        socket closes at once instead of waiting for the stream."""
        await self.sim.wait_for(lambda: len(self.opens()) > seen)
        request = self.opens()[seen]
        await self.sim.send(VncClose(stream_id=request.stream_id, reason="the test is done"))
        return request


@pytest_asyncio.fixture
async def stack(sqlite_store: Store, tmp_path: Path) -> AsyncIterator[Stack]:
    settings = fast_settings(tmp_path / "home", allowed_origins=["https://console.example.com"])
    async with serve_control_plane(settings, sqlite_store) as harness:
        store = harness.cp.store
        for name in ("alice", "bob"):
            await store.create_user(User(username=name, role="user", created_at=utcnow()), "x")
        sim = await harness.agent("agent-a")
        await harness.template()
        first, second = await harness.session(), await harness.session()
        yield Stack(
            harness,
            sim,
            await harness.wait_state(first.id, "running"),
            await harness.wait_state(second.id, "running"),
        )


async def refusal(
    url: str, headers: dict[str, str] | None = None, origin: str | None = None
) -> tuple[int, str]:
    """Open ``url`` expecting an HTTP refusal of the upgrade; return its status and error
    code. A socket that is accepted (101), even if closed right after, fails the test."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            url,
            additional_headers=headers or {},
            origin=Origin(origin) if origin else None,
            open_timeout=WAIT_S,
            compression=None,
        ):
            pass
    response = refused.value.response
    body = json.loads(response.body or b"{}")
    return response.status_code, str(body.get("error", {}).get("code"))


@pytest.mark.asyncio
async def test_every_websocket_route_refuses_an_unauthenticated_upgrade_before_it_opens(
    stack: Stack,
) -> None:
    """Authentication bypass and pre-authentication exposure on WebSocket upgrades
    (sockets accepted first and checked later, or checked with the wrong credential).

    Every WebSocket route of the app is tried with no credential, garbage, and each other
    kind of credential the system issues (a user's JWT, an agent token, a VNC token, a
    relay ticket, a token in the wrong place). Each must be refused with an HTTP status
    in the handshake (never a 101 followed by a close), and no ``vnc.open`` may reach the
    agent. Then the right credential opens each VNC route, and the agent does hear of it,
    so the check can fail. (Missing, wrong and revoked agent tokens on
    ``/api/v1/agents/connect``, and bad or used viewer tokens, are in
    ``test_agents_ws.py`` and ``test_vnc.py``.)
    """
    cp, sid = stack.cp, stack.session.id
    agent_token = await stack.harness.token("agent-a")
    jwt, _ = auth.issue_token(cp.jwt_secret, "admin", "admin", 600)
    vnc_token = await stack.vnc_token()
    ticket = await stack.relay_ticket()
    other_ticket = await stack.relay_ticket(stack.other)
    vnc = f"/vnc/{sid}"
    relay = f"/internal/v1/vnc/{sid}"
    stream = "/api/v1/agents/vnc/"
    cases: list[tuple[str, dict[str, str], int]] = []
    for path in AGENT_PATHS:
        cases += [
            (path, {}, 401),
            (path, bearer("garbage"), 401),
            (path, {"Authorization": "Basic YWdlbnQtYTpzZWNyZXQ="}, 401),
            (path, bearer(jwt), 401),
            (path, bearer(vnc_token), 401),
            (path, bearer(ticket), 401),
            (f"{path}?token={agent_token}", {}, 401),  # never from the URL
        ]
    cases += [
        (vnc, {}, 403),
        (f"{vnc}?token=", {}, 403),
        (f"{vnc}?token={agent_token}", {}, 403),
        (f"{vnc}?token={jwt}", {}, 403),
        (f"{vnc}?token={ticket}", {}, 403),  # a relay ticket is not a viewer's token
        (vnc, bearer(jwt), 403),
        (relay, {}, 401),
        (relay, bearer("garbage"), 403),
        (relay, bearer(vnc_token), 403),  # a viewer's token is not a relay ticket
        (relay, bearer(jwt), 403),
        (relay, bearer(agent_token), 403),
        (relay, bearer(other_ticket), 403),  # bound to the other session
        (f"{relay}?token={ticket}", {}, 401),
        (stream + "made-up", {}, 403),
        (stream + "made-up", bearer(agent_token), 403),  # an agent's own credential
        (stream + vnc_token, {}, 403),
        (stream + ticket, {}, 403),
        (stream + agent_token, bearer(agent_token), 403),
    ]
    app = create_app(cp)
    routes = {r.path for r in app.routes if isinstance(r, WebSocketRoute)}
    tried = {path.partition("?")[0] for path, _, _ in cases}
    covered = {r for r in routes if any(re.fullmatch(_pattern(r), p) for p in tried)}
    assert covered == routes, f"untested WebSocket routes: {routes - covered}"

    for path, headers, status in cases:
        got = await refusal(stack.url(path), headers)
        assert got[0] == status, (path, headers, got)
        assert got[1] in {"unauthorized", "forbidden"}, (path, got)
    assert stack.opens() == []
    assert [a.agent_id for a in await cp.store.list_agents()] == ["agent-a"]

    # The right credentials open both VNC routes, and the agent hears of each.
    async with connect(stack.url(f"{vnc}?token={await stack.vnc_token()}")) as ws:
        assert (await stack.answer_open(0)).session_id == sid
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    async with connect(stack.url(relay), additional_headers=bearer(ticket)) as ws:
        assert (await stack.answer_open(1)).session_id == sid
        with pytest.raises(ConnectionClosed):
            await ws.recv()


def _pattern(route_path: str) -> str:
    return re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(route_path))


@pytest.mark.asyncio
async def test_browser_sockets_refuse_foreign_and_null_origins(stack: Stack) -> None:
    """Cross-site WebSocket hijacking (CSWSH).

    A page on another site can open a WebSocket to the control plane from the victim's
    browser; ``/vnc/{id}`` must refuse it by ``Origin`` before the token is even looked
    at. Refused: a foreign site, ``null`` (sandboxed frames, ``file:``, some redirects),
    look-alike hosts (a suffix, a user-info trick, another port or name of the same
    machine, the allowed origin over plain HTTP). Accepted: this host and each of
    ``ALLOWED_ORIGINS`` (any case, a trailing slash), and no ``Origin`` at all (not a
    browser). A refusal leaves the token usable and the agent unaware. (A foreign site
    and this host are also in ``test_vnc.py``.)
    """
    host = stack.harness.url.removeprefix("ws://")
    port = host.rpartition(":")[2]
    token = await stack.vnc_token()
    url = stack.url(f"/vnc/{stack.session.id}?token={token}")
    for origin in (
        "https://evil.example",
        "null",
        f"http://{host}.evil.example",
        f"http://{host}@evil.example",
        f"http://evil.example:{port}",
        f"http://localhost:{port}",
        "http://127.0.0.1",
        "http://console.example.com",
        "https://console.example.com.evil.example",
        "https://evil.example/https://console.example.com",
    ):
        assert await refusal(url, origin=origin) == (403, "forbidden"), origin
    assert stack.opens() == []

    accepted: list[str | None] = [
        f"http://{host}",
        "https://console.example.com",
        "HTTPS://Console.Example.COM/",
        None,  # not a browser
    ]
    for seen, allowed in enumerate(accepted):
        token = token if seen == 0 else await stack.vnc_token()  # the refused one still works
        async with connect(
            stack.url(f"/vnc/{stack.session.id}?token={token}"),
            origin=Origin(allowed) if allowed else None,
        ) as ws:
            await stack.answer_open(seen)
            with pytest.raises(ConnectionClosed):
                await ws.recv()


# -- VNC tokens --------------------------------------------------------------------------


async def attempt(stack: Stack, path: str, seen: int = 0) -> int:
    """Open a viewer at ``path``; return 101 if it was accepted (its ``vnc.open``, the
    ``seen``-th, is answered with a close), else the HTTP status of the refusal."""
    try:
        async with connect(stack.url(path), open_timeout=WAIT_S) as ws:
            await stack.answer_open(seen)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.asyncio
async def test_a_vnc_token_opens_one_socket_even_when_raced(stack: Stack) -> None:
    """Race condition (TOCTOU) in single-use token redemption.

    Eight viewers present one token at the same moment: exactly one socket opens and the
    agent is asked for exactly one stream. (Sequential reuse is in ``test_vnc.py``; across
    replicas, in ``test_replicas.py``.)
    """
    path = f"/vnc/{stack.session.id}?token={await stack.vnc_token()}"
    statuses = await asyncio.gather(*(attempt(stack, path) for _ in range(8)))
    assert sorted(statuses) == [101] + [403] * 7
    assert len(stack.opens()) == 1


@pytest.mark.asyncio
async def test_a_vnc_token_lives_60_seconds_in_the_grant_and_in_the_hub(stack: Stack) -> None:
    """Replay of a captured token (a link in a browser history, a proxy's log): the
    window is 60 s, enforced twice over.

    A token is accepted just before its 60 s are up and refused once they are: by the
    grant's own expiry even if the hub still holds it, and by the hub's TTL even if the
    clock of the grant says it is fresh. The expiry the API reports is the same 60 s.
    (A token 61 s old is refused in ``test_vnc.py``.)
    """
    wall = [time.time()]
    mono = [time.monotonic()]
    hub = stack.cp.hub
    assert isinstance(hub, MemoryHub)
    hub.tickets = Tickets(clock=lambda: mono[0])
    stack.cp.extras["vnc.tokens"] = VncTokens(hub, clock=lambda: wall[0])
    path = f"/vnc/{stack.session.id}?token="

    token, expires_at = await vnc_service.issue_token(stack.cp, ALICE, stack.session.id)
    assert expires_at.timestamp() == pytest.approx(wall[0] + vnc_service.TOKEN_TTL_S)
    assert vnc_service.TOKEN_TTL_S == 60
    wall[0] += 59.9
    mono[0] += 59.9
    assert await attempt(stack, path + token) == 101

    grant_expired = await stack.vnc_token()
    wall[0] += 60  # the hub's clock has not moved
    assert await attempt(stack, path + grant_expired) == 403

    hub_expired = await stack.vnc_token()
    mono[0] += 60  # the grant's clock has not moved
    assert await attempt(stack, path + hub_expired) == 403
    assert len(stack.opens()) == 1


@pytest.mark.asyncio
async def test_a_vnc_token_is_bound_to_its_session_and_its_user(stack: Stack) -> None:
    """Insecure direct object reference through a viewer token: a token for one session
    opening another.

    Alice's token for her second session does not open her first (the binding is to the
    session, not only to the user), and is used up by the attempt. (Bob's token on
    alice's session, and bob being refused a token for it, are in ``test_vnc.py``.)
    """
    first = f"/vnc/{stack.session.id}?token="
    second = f"/vnc/{stack.other.id}?token="
    token = await stack.vnc_token(stack.other)
    assert await attempt(stack, first + token) == 403
    assert await attempt(stack, second + token) == 403  # used up
    assert stack.opens() == []
    assert await attempt(stack, second + await stack.vnc_token(stack.other)) == 101


@pytest.mark.asyncio
async def test_a_vnc_token_dies_with_its_user(stack: Stack) -> None:
    """Broken access control after deprovisioning: a credential outliving its user.

    An admin (who may view every session) takes a token for alice's session and is
    deleted before presenting it; the token must open nothing.
    """
    carol = Principal(username="carol", role="admin")
    await stack.cp.store.create_user(User(username="carol", role="admin", created_at=utcnow()), "x")
    token = await stack.vnc_token(user=carol)  # admins may view every session
    await user_service.delete_user(stack.cp, Principal(username="admin", role="admin"), "carol")
    assert await attempt(stack, f"/vnc/{stack.session.id}?token={token}") == 403
    assert stack.opens() == []


# -- one agent against another -----------------------------------------------------------


async def handled(sim: AgentSim) -> None:
    """Wait until the control plane has handled every frame ``sim`` sent so far: frames
    of one socket are handled in order, so the answer to a bogus ack shows it."""
    seen = len(sim.errors)
    await sim.send(CommandAck(command_id=f"c-sync-{seen}"))
    assert (await sim.next_error(seen)).code == "unknown_command"


@pytest.mark.asyncio
async def test_an_agent_can_never_serve_read_or_stop_another_agents_sessions(
    stack: Stack,
) -> None:
    """Insecure direct object reference between agents (a compromised or buggy agent
    acting on ids that belong to another).

    Agent B, with a valid token of its own, acknowledges and answers agent A's pending
    stop command, reports A's sessions stopped or failed (as frames and in its hello),
    answers and closes A's VNC streams on either transport, and feeds bytes into them.
    Each is refused or ignored: A's command stays pending, A's sessions keep their
    state and agent, A's viewers see only A's bytes, and A can still finish its command.
    (B registering under A's id is refused in ``test_agents_ws.py``.)
    """
    cp, a, sid = stack.cp, stack.sim, stack.session.id
    b = await stack.harness.agent("agent-b")
    a.auto_execute = False
    await session_service.set_desired_state(cp, ALICE, sid, "stopped")
    stop = await a.command_for(sid, "stop")
    before = await cp.store.get_session(sid)
    other_before = await cp.store.get_session(stack.other.id)
    assert before is not None
    assert other_before is not None

    await b.send(CommandAck(command_id=stop.command_id))
    assert (await b.next_error(0)).code == "unknown_command"
    stopped = SessionStatus(session_id=sid, generation=stop.generation, state="stopped")
    result = CommandResult(
        command_id=stop.command_id,
        session_id=sid,
        generation=stop.generation,
        ok=True,
        status=stopped,
    )
    await b.send(result)
    assert (await b.next_error(1)).code == "unknown_command"
    for state in ("stopped", "failed"):
        for session in (before, other_before):
            report = SessionStatus(
                session_id=session.id, generation=session.generation, state=state
            )
            await b.send(SessionStatusReport(status=report))
    await handled(b)
    b_states = [
        SessionStatus(session_id=s.id, generation=s.generation, state="stopped")
        for s in (before, other_before)
    ]
    again = await stack.harness.agent("agent-b", connect=False)
    await again.connect(sessions=b_states)
    await handled(again)

    row = await cp.store.get_command(stop.command_id)
    assert row is not None
    assert (row.agent_id, row.acked_at, row.result) == ("agent-a", None, None)
    assert row.status not in ("completed", "failed")
    for session in (before, other_before):
        now = await cp.store.get_session(session.id)
        assert now is not None
        assert (now.state, now.agent_id, now.generation) == (
            session.state,
            "agent-a",
            session.generation,
        )
    audit = await cp.store.list_audit(limit=100)
    assert {(r.actor, r.action) for r in audit} >= {("agent:agent-b", "session.unknown")}

    # B answers a viewer's stream on A (ws-mux), feeds it and closes it: nothing happens.
    token = await stack.vnc_token(stack.other)
    async with connect(stack.url(f"/vnc/{stack.other.id}?token={token}")) as ws:
        await a.wait_for(lambda: len(stack.opens()) == 1)
        (request,) = stack.opens()
        assert stack.opens(again) == []
        await again.send(VncOpened(stream_id=request.stream_id))
        await again.send(encode_data(request.stream_id, b"from-b"))
        await again.send(VncClose(stream_id=request.stream_id, reason="hijacked"))
        await handled(again)
        await a.send(VncOpened(stream_id=request.stream_id))
        await a.send(encode_data(request.stream_id, b"from-a"))
        assert await asyncio.wait_for(ws.recv(), WAIT_S) == b"from-a"
        await a.send(VncClose(stream_id=request.stream_id, reason="done"))
        with pytest.raises(ConnectionClosed):
            await ws.recv()

    # The same on ws-dedicated: B's close of A's pending stream does not end it.
    d = await stack.harness.agent("agent-d", connect=False, labels={"pool": "d"})
    await d.connect(transports=["ws-dedicated"])
    placed = await stack.harness.session(labels={"pool": "d"})
    await stack.harness.wait_state(placed.id, "running")
    token = await stack.vnc_token(placed)
    async with connect(stack.url(f"/vnc/{placed.id}?token={token}")) as ws:
        await d.wait_for(lambda: bool(stack.opens(d)))
        (request,) = stack.opens(d)
        assert request.stream_token
        await again.send(VncClose(stream_id=request.stream_id, reason="hijacked"))
        await handled(again)
        dial = stack.url(DEDICATED_STREAM_PATH.format(stream_token=request.stream_token))
        async with connect(dial) as stream:
            await stream.send(b"from-d")
            assert await asyncio.wait_for(ws.recv(), WAIT_S) == b"from-d"
    assert stack.opens(again) == []

    # A, whose command it is, finishes it.
    await a.ack(stop)
    await a.send(await a.execute(stop))
    assert (await stack.harness.wait_state(sid, "stopped")).agent_id == "agent-a"


# -- user tokens (JWT) -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value).encode())


def _jwt(header: dict[str, Any], claims: dict[str, Any], key: bytes, digest: str = "sha256") -> str:
    """A compact JWS signed by hand with HMAC-``digest`` under ``key``, whatever the
    header says (pyjwt would refuse to write most of these)."""
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def _admin_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": ADMIN, "role": "admin", "kind": "api", "iat": now}
    claims["exp"] = now + 600
    claims.update(changes)
    return claims


_KEY = apikit.SECRET.encode()
_HS256 = {"alg": "HS256", "typ": "JWT"}
_ATTACKER = b"attacker-key-attacker-key-attacker-key!!"

FORGED: dict[str, Callable[[], str]] = {
    "alg None": lambda: f"{_segment({'alg': 'None'})}.{_segment(_admin_claims())}.",
    "alg NONE": lambda: f"{_segment({'alg': 'NONE'})}.{_segment(_admin_claims())}.",
    "alg none, signature kept": lambda: _jwt({"alg": "none"}, _admin_claims(), _KEY),
    "HS256, signature stripped": lambda: (
        _jwt(_HS256, _admin_claims(), _KEY).rsplit(".", 1)[0] + "."
    ),
    "alg hs256 (lower case)": lambda: _jwt({"alg": "hs256"}, _admin_claims(), _KEY),
    "HS384 under our key": lambda: _jwt({"alg": "HS384"}, _admin_claims(), _KEY, "sha384"),
    "RS256 header, HMAC under our key": lambda: _jwt({"alg": "RS256"}, _admin_claims(), _KEY),
    "ES256 header, HMAC under our key": lambda: _jwt({"alg": "ES256"}, _admin_claims(), _KEY),
    "embedded jwk (the attacker's key)": lambda: _jwt(
        {**_HS256, "jwk": {"kty": "oct", "k": _b64(_ATTACKER)}}, _admin_claims(), _ATTACKER
    ),
    "kid pointing at an empty file": lambda: _jwt(
        {**_HS256, "kid": "../../../../../../dev/null"}, _admin_claims(), b""
    ),
    "jku of the attacker": lambda: _jwt(
        {**_HS256, "jku": "https://evil.example/jwks.json"}, _admin_claims(), _ATTACKER
    ),
    "audience of another service": lambda: _jwt(_HS256, _admin_claims(aud="billing"), _KEY),
    "not valid yet (nbf)": lambda: _jwt(_HS256, _admin_claims(nbf=int(time.time()) + 600), _KEY),
    "sub not a string": lambda: _jwt(_HS256, _admin_claims(sub=["admin"]), _KEY),
    "JSON serialisation": lambda: json.dumps(
        {"payload": _segment(_admin_claims()), "protected": _segment(_HS256), "signature": ""}
    ),
}


@pytest.mark.asyncio
async def test_forged_jwts_are_refused_with_401(sqlite_store: Store, tmp_path: Path) -> None:
    """JWT algorithm confusion, ``alg: none`` and header-injection forgeries.

    Tokens an attacker can make without the key, or from a key the header points at,
    are refused with 401 on an admin route and a user route: ``none`` in any case or
    with a signature, a stripped signature, other or lower-case algorithms, RS/ES
    headers over an HMAC of the server's key, an embedded ``jwk``, a ``kid`` or ``jku``
    naming the attacker's key, and the JSON serialisation; and, under the server's own
    key (a sibling service sharing it), another service's audience, ``nbf`` in the
    future and a ``sub`` that is not a name. The code sets no ``iss`` or ``aud``
    (so only a foreign ``aud`` can be tried). The same hand signing with the right
    header and key is accepted, so the refusals are the server's. (``alg: none``,
    HS512, an RS256 header, expiry, another key and missing claims are in
    ``test_auth.py`` and ``test_api_auth.py``.)
    """
    async with apikit.running(sqlite_store, tmp_path) as api:
        genuine = bearer(_jwt(_HS256, _admin_claims(), _KEY))
        for path in ("/api/v1/users", "/api/v1/sessions"):
            assert (await api.client.get(path, headers=genuine)).status_code == 200
            for name, forge in FORGED.items():
                response = await api.client.get(path, headers=bearer(forge()))
                assert response.status_code == 401, (name, path, response.text)
                assert response.json()["error"]["code"] == "unauthorized", name


# -- the login page ----------------------------------------------------------------------


UNSAFE_NEXT = [
    "https://evil.example/",
    "//evil.example",
    "/\\evil.example",  # browsers read a backslash as a slash
    "\\\\evil.example",
    "/\t/evil.example",  # the URL parser drops tabs and newlines: //evil.example
    "/\n/evil.example",
    " //evil.example",
    "javascript:alert(document.domain)",
    "data:text/html,<script>alert(1)</script>",
]
SAFE_NEXT = ["/ui/sessions", "/ui/sessions/s-0123456789abcdef/view", "/ui/admin/tokens?agent=a1"]


@pytest.mark.asyncio
async def test_login_never_redirects_off_site(sqlite_store: Store, tmp_path: Path) -> None:
    """Open redirect after login (phishing through a trusted link).

    The login page sends the browser to its ``next`` parameter after logging in. An
    absolute, scheme-relative or script target, and the paths a browser's URL parser
    turns into one (a backslash, a tab or a newline after the first slash), must never be
    followed: the server answers such a login link with a redirect to the bare login
    page before its script runs, whichever ``next`` of several is the bad one, and puts
    no target into any page. Paths of this site are served as they are; ``/`` ignores
    ``next`` altogether.
    """
    async with apikit.running(sqlite_store, tmp_path) as api:
        client = api.client
        for target in UNSAFE_NEXT:
            queries = [
                [("next", target)],
                [("next", "/ui/sessions"), ("next", target)],
                [("next", target), ("next", "/ui/sessions")],
            ]
            for query in queries:
                response = await client.get("/ui/login?" + urlencode(query))
                assert response.status_code == 303, (target, response.text)
                assert response.headers["location"] == "/ui/login", target
                assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        bare = (await client.get("/ui/login")).text
        for target in SAFE_NEXT:
            response = await client.get("/ui/login", params={"next": target})
            assert response.status_code == 200, target
            assert response.text == bare  # the script reads it from the URL
        home = await client.get("/", params={"next": "//evil.example"})
        assert (home.status_code, home.headers["location"]) == (303, "/ui/sessions")


# -- secrets in output -------------------------------------------------------------------


REDIS = "redis://127.0.0.1:6379/0"
SECRETS = {
    "JWT_SECRET": "jwt-" + secrets.token_urlsafe(32),
    "ADMIN_PASSWORD": "admin-" + secrets.token_urlsafe(16),
    "DB_PASSWORD": "db-" + secrets.token_urlsafe(16),
    "REDIS_PASSWORD": "redis-" + secrets.token_urlsafe(16),
    "AGENT_TOKEN": auth.new_agent_token("agent-a")[0],
}
"""One value per kind of secret, made fresh for this run (so a match is never chance)."""
_SETTINGS_VARIABLES = {
    name.upper()
    for model in (ControlPlaneSettings, AgentSettings, PluginSettings)
    for name in model.model_fields
}


def assert_no_secrets(output: str, kept: dict[str, str]) -> None:
    """Fail naming each secret a fragment of which is in ``output``, with the lines."""
    found = {name: leaks(value, output) for name, value in kept.items()}
    lines = [line for line in output.splitlines() if any(leaks(v, line) for v in kept.values())]
    assert not any(found.values()), f"{[n for n, f in found.items() if f]}:\n" + "\n".join(
        lines[:20]
    )


def _secret_part(agent_token: str) -> str:
    """``ssa_<token id>_<secret>``: the id is public (listed by the API), the rest not."""
    return agent_token.split("_", 2)[2]


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Every secret a process reads from the environment, set."""
    values = {
        "JWT_SECRET": SECRETS["JWT_SECRET"],
        "ADMIN_PASSWORD": SECRETS["ADMIN_PASSWORD"],
        "DB_PASSWORD": SECRETS["DB_PASSWORD"],
        "REDIS_URL": f"redis://default:{SECRETS['REDIS_PASSWORD']}@127.0.0.1:6379/0",
        "AGENT_TOKEN": SECRETS["AGENT_TOKEN"],
        "AGENT_ID": "agent-a",
        "CONTROL_PLANE_URL": "ws://127.0.0.1:9",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def kept_secrets() -> dict[str, str]:
    return {**SECRETS, "AGENT_TOKEN": _secret_part(SECRETS["AGENT_TOKEN"])}


@pytest.mark.parametrize("json_output", [False, True])
def test_plugins_and_settings_show_no_secrets(
    secret_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    json_output: bool,
) -> None:
    """Secrets disclosed by diagnostic output (plugin listings, settings dumps).

    With every secret set in the environment, ``streamspace-controlplane plugins`` and
    ``streamspace-agent plugins`` (table and JSON) list the installed drivers and none of
    the secrets; the settings both processes read show them only as ``**********``, and
    so does the error of a setting that fails beside them. (The admin password, JWT and
    DB secrets in the control plane's settings are in ``test_settings.py``.)
    """
    flags = ["--json"] if json_output else []
    for main in (controlplane_main, agent_main):
        main(["plugins", *flags])
        out, err = capsys.readouterr()
        assert "streamspace.platforms" in out
        assert_no_secrets(out + err, kept_secrets())

    cp = load_settings(ControlPlaneSettings, streamspace_home=tmp_path)
    agent = load_settings(AgentSettings)
    assert cp.redis_url is not None
    assert agent.agent_token is not None
    shown = f"{cp!r} {cp} {cp.model_dump()} {cp.model_dump_json()} {agent!r} {agent}"
    shown += agent.model_dump_json()
    assert "**********" in shown
    assert_no_secrets(shown, kept_secrets())
    with pytest.raises(ConfigError) as bad:  # a secret of the wrong type is not quoted
        load_settings(
            ControlPlaneSettings,
            db_port="nope",
            redis_url=[f"redis://:{SECRETS['REDIS_PASSWORD']}@127.0.0.1"],
        )
    assert "DB_PORT" in str(bad.value)
    assert "REDIS_URL" in str(bad.value)
    assert_no_secrets(str(bad.value), kept_secrets())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://:{secret}@127.0.0.1:6379/0", "must be a redis://"),
        ("redis://:{secret}@127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("rediss://user:{secret}@127.0.0.1:6379/zero", None),
    ],
)
def test_a_bad_redis_url_is_reported_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    url: str,
    expected: str | None,
) -> None:
    """Credentials echoed in error messages (a bad URL quoted back whole).

    ``streamspace-controlplane`` started with a ``REDIS_URL`` it cannot use says what is
    wrong and names the variable, without the password; one it can parse shows the
    password as ``***`` in the form its log lines and ``/ready`` use.
    """
    password = SECRETS["REDIS_PASSWORD"]
    monkeypatch.setenv("STREAMSPACE_HOME", str(tmp_path))
    monkeypatch.setenv("AGENT_HUB_BACKEND", "redis")
    monkeypatch.setenv("INTERNAL_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("REDIS_URL", url.format(secret=password))
    if expected is not None:
        assert controlplane_main(["migrate"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: REDIS_URL: ")
        assert expected in err
        assert_no_secrets(err, {"REDIS_PASSWORD": password})
    else:
        hub = RedisHub(load_settings(ControlPlaneSettings))
        assert "***" in hub.redis_url
        assert_no_secrets(hub.redis_url, {"REDIS_PASSWORD": password})


@pytest.mark.parametrize("cut", ["#", "/"])
def test_a_redis_password_with_a_url_delimiter_is_not_echoed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cut: str
) -> None:
    """Credentials echoed in error messages: a generated password that happens to hold a
    URL delimiter, not percent-encoded in ``REDIS_URL``."""
    password = f"first-half-of-it{cut}second-half-of-it"
    settings = ControlPlaneSettings(
        streamspace_home=tmp_path,
        agent_hub_backend="redis",
        internal_url="http://127.0.0.1:1",
        redis_url=SecretStr(f"redis://:{password}@127.0.0.1:6379/0"),
    )
    try:
        hub = RedisHub(settings)
    except Exception as exc:  # whatever it raises is what the operator reads
        shown = f"{type(exc).__name__}: {exc}"
    else:
        shown = hub.redis_url
    assert_no_secrets(shown, {"REDIS_PASSWORD": password})


def test_a_db_password_with_url_delimiters_is_not_echoed(tmp_path: Path) -> None:
    """Credentials echoed in error messages: ``DB_PASSWORD`` with URL delimiters."""
    password = "first-part-of-it@second-part-of-it/third-part-of-it"
    settings = ControlPlaneSettings(
        streamspace_home=tmp_path, db_host="127.0.0.1", db_password=SecretStr(password)
    )
    assert_no_secrets(repr(PostgresStore(settings=settings)), {"DB_PASSWORD": password})


async def _lines_until(stream: asyncio.StreamReader, marker: str, into: list[str]) -> None:
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"the server exited before {marker!r}:\n" + "".join(into))
        into.append(line.decode(errors="replace"))
        if marker in into[-1]:
            return


@pytest.mark.asyncio
async def test_serve_logs_no_secret_at_debug(
    fresh_pg_dsn: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Secrets written to logs (start-up banners, connection strings, request traces).

    ``streamspace-controlplane serve`` runs on PostgreSQL with ``DB_PASSWORD`` and on
    Redis with a password in ``REDIS_URL``, with ``JWT_SECRET`` and ``ADMIN_PASSWORD``
    set and ``LOG_LEVEL=DEBUG``. Logins fail and succeed, an agent token is issued, an
    agent connects with it and another is refused. Everything the process writes, from
    start to exit, holds none of those secrets, nor the JWT the login returned.
    """
    database = urlsplit(fresh_pg_dsn).path.lstrip("/")
    env = {k: v for k, v in os.environ.items() if k.upper() not in _SETTINGS_VARIABLES}
    env.update(
        DB_HOST="127.0.0.1",
        DB_USER="postgres",
        DB_NAME=database,
        DB_PASSWORD=SECRETS["DB_PASSWORD"],  # the server trusts local users: never asked
        JWT_SECRET=SECRETS["JWT_SECRET"],
        ADMIN_PASSWORD=SECRETS["ADMIN_PASSWORD"],
        AGENT_HUB_BACKEND="redis",
        REDIS_URL=f"redis://default:{SECRETS['REDIS_PASSWORD']}@127.0.0.1:6379/0",
        REDIS_KEY_PREFIX=redis_prefix,
        POD_NAME="security",
        INTERNAL_URL="http://127.0.0.1:1",  # no other replica dials it
        HOST="127.0.0.1",
        PORT="0",
        LOG_LEVEL="DEBUG",
        STREAMSPACE_HOME=str(tmp_path / "home"),
        STREAMSPACE_LOAD_PLUGINS="",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamspace_controlplane.cli",
        "serve",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    output: list[str] = []
    kept = {**SECRETS}
    try:
        async with asyncio.timeout(30):
            await _lines_until(process.stdout, "Uvicorn running on", output)
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:(\d+))", output[-1])
        assert found is not None, output[-1]
        base, port = found.group(1), int(found.group(2))
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http:
            wrong = {"username": "admin", "password": SECRETS["ADMIN_PASSWORD"][::-1]}
            assert (await http.post("/api/v1/auth/login", json=wrong)).status_code == 401
            right = {"username": "admin", "password": SECRETS["ADMIN_PASSWORD"]}
            login = await http.post("/api/v1/auth/login", json=right)
            assert login.status_code == 200, login.text
            kept["user JWT"] = login.json()["token"]
            issued = await http.post(
                "/api/v1/agents/agent-a/tokens", headers=bearer(kept["user JWT"])
            )
            assert issued.status_code == 201, issued.text
            token = issued.json()["token"]
            kept["AGENT_TOKEN"] = _secret_part(token)
            sim = AgentSim(f"ws://127.0.0.1:{port}", token, "agent-a")
            await sim.connect()
            await handled(sim)
            await sim.close()
            with pytest.raises(Refused):
                await AgentSim(f"ws://127.0.0.1:{port}", SECRETS["AGENT_TOKEN"], "x").connect()
            ready = await http.get("/ready")
            assert ready.status_code == 200, ready.text
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
        output.append(rest.decode(errors="replace"))
    logged = "".join(output)
    assert "Redis AgentHub initialized" in logged
    assert "DEBUG" in logged
    assert '"WebSocket /api/v1/agents/connect" [accepted]' in logged
    assert_no_secrets(
        logged, {**kept, "AGENT_TOKEN (refused)": _secret_part(SECRETS["AGENT_TOKEN"])}
    )
