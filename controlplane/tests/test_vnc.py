"""The VNC path end to end: viewer → ``/vnc/{id}`` → agent (``ws-mux``) → a real Xvnc.

A real control plane on uvicorn, a real :class:`~streamspace_sdk.Agent` with the ``process``
platform, real Xvnc sessions, and the SDK kit's RFB viewer speaking over the ``websockets``
client (subprotocol ``binary``) and, for comparison, over TCP straight to the VNC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from agentsim import Harness, eventually, fast_settings, serve_control_plane
from apikit import bearer, isolate
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from streamspace_controlplane.services.vnc import VncTokens
from streamspace_controlplane.store.base import Store
from streamspace_sdk import Agent, AgentSettings
from streamspace_sdk.agent import Backoff
from streamspace_sdk.hooks import Hooks, make_plugin_manager
from streamspace_sdk.platforms import ProcessPlatform
from streamspace_sdk.protocol import VncOpen
from streamspace_sdk.settings import PluginSettings
from streamspace_sdk.testing import (
    RFB_VERSION,
    RfbStream,
    read_framebuffer,
    rfb_handshake,
    rfb_tcp,
)

AGENT_ID = "vnc-agent"
ADMIN_PASSWORD = "admin-password-for-tests"
USER_PASSWORD = "user-password-1"


@pytest.fixture(autouse=True)
def _xvnc() -> None:
    """Fail, never skip, without a real Xvnc: the README's test command installs it."""
    if shutil.which("Xvnc") is None or shutil.which("xterm") is None:
        pytest.fail("Xvnc or xterm missing: apt-get install tigervnc-standalone-server xterm")


# -- the environment -----------------------------------------------------------------------


@dataclass
class Env:
    harness: Harness
    agent: Agent
    platform: ProcessPlatform
    http: httpx.AsyncClient
    admin: dict[str, str]
    alice: dict[str, str]
    bob: dict[str, str]
    session_id: str
    """Alice's running session."""

    @property
    def ws_base(self) -> str:
        return self.harness.url

    async def start_session(self, headers: dict[str, str]) -> str:
        response = await self.http.post(
            "/api/v1/sessions", json={"template": "desktop"}, headers=headers
        )
        assert response.status_code == 201, response.text
        session_id: str = response.json()["id"]
        await self.harness.wait_state(session_id, "running", timeout_s=30)
        return session_id

    async def token(
        self, session_id: str | None = None, headers: dict[str, str] | None = None
    ) -> str:
        response = await self.vnc_token(session_id, headers)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["url"] == f"/vnc/{session_id or self.session_id}?token={body['token']}"
        token: str = body["token"]
        return token

    async def vnc_token(
        self, session_id: str | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.http.post(
            f"/api/v1/sessions/{session_id or self.session_id}/vnc-token",
            headers=self.alice if headers is None else headers,
        )

    def viewer(self, token: str | None, session_id: str | None = None, **options: Any) -> Any:
        query = "" if token is None else f"?token={token}"
        return connect(
            f"{self.ws_base}/vnc/{session_id or self.session_id}{query}",
            subprotocols=[Subprotocol("binary")],
            compression=None,
            max_size=None,
            **options,
        )

    async def vnc_port(self, session_id: str | None = None) -> int:
        status = await self.platform.status(session_id or self.session_id)
        assert status is not None
        assert status.vnc is not None
        return status.vnc.port

    def sample(self, name: str, **labels: str) -> float:
        value = self.harness.cp.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


async def _login(http: httpx.AsyncClient, username: str, password: str) -> dict[str, str]:
    response = await http.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    return bearer(response.json()["token"])


@contextlib.asynccontextmanager
async def environment(
    store: Store, tmp_path: Path, *, transport: str = "ws-mux", **overrides: Any
) -> AsyncIterator[Env]:
    settings = fast_settings(tmp_path / "home", **overrides)
    async with serve_control_plane(settings, store) as harness:
        base = "http" + harness.url.removeprefix("ws")
        async with httpx.AsyncClient(base_url=base) as http:
            admin = await _login(http, "admin", ADMIN_PASSWORD)
            for user in ("alice", "bob"):
                created = await http.post(
                    "/api/v1/users",
                    json={"username": user, "password": USER_PASSWORD},
                    headers=admin,
                )
                assert created.status_code == 201, created.text
            await harness.template("desktop")
            platform = ProcessPlatform(
                ProcessPlatform.Settings(
                    process_state_dir=tmp_path / "state",
                    process_start_timeout=15.0,
                    process_stop_timeout=1.0,
                ),
                agent_id=AGENT_ID,
            )
            agent = Agent(
                AgentSettings(
                    agent_id=AGENT_ID,
                    control_plane_url=harness.url,
                    agent_token=SecretStr(await harness.token(AGENT_ID)),
                    health_port=0,
                    vnc_transport=transport,
                ),
                platform,
                hooks=Hooks(
                    make_plugin_manager(
                        settings=PluginSettings(streamspace_load_plugins=""),
                        load_entrypoints=False,
                    )
                ),
                backoff=Backoff(base_s=0.01, cap_s=0.05, reset_after_s=60.0),
            )
            task = asyncio.create_task(agent.serve())
            try:
                env = Env(
                    harness=harness,
                    agent=agent,
                    platform=platform,
                    http=http,
                    admin=admin,
                    alice=await _login(http, "alice", USER_PASSWORD),
                    bob=await _login(http, "bob", USER_PASSWORD),
                    session_id="",
                )
                env.session_id = await env.start_session(env.alice)
                yield env
            finally:
                await agent.stop()
                await task
                for status in await platform.list_sessions():
                    await platform.stop(status.session_id, status.generation + 1)


TRANSPORTS = ["ws-mux", "ws-dedicated"]
"""Every test with an ``env`` runs once per transport the control plane offers."""


@pytest_asyncio.fixture(params=TRANSPORTS)
async def env(
    sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: Any
) -> AsyncIterator[Env]:
    isolate(monkeypatch)
    for name in AgentSettings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    async with environment(sqlite_store, tmp_path, transport=request.param) as made:
        yield made


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rfb_through_the_proxy_equals_a_direct_connection(env: Env) -> None:
    """Banner, ServerInit and a full framebuffer match what the VNC port gives directly.

    The desktop may still be blank or drawing (xterm starting, its shell prompt), so
    screenshots are compared once two direct ones taken around the proxied one agree and
    show something.
    """
    sid = env.session_id
    async with rfb_tcp("127.0.0.1", await env.vnc_port()) as tcp:
        direct_banner, direct = await rfb_handshake(tcp)
        await read_framebuffer(tcp, direct)
        async with env.viewer(await env.token()) as ws:
            assert ws.subprotocol == "binary"
            viewer = RfbStream.websocket(ws)
            proxied_banner, proxied = await rfb_handshake(viewer)
            await read_framebuffer(viewer, proxied)
            assert env.sample("streamspace_vnc_viewers", session_id=sid) == 1
            for _ in range(50):
                before = await read_framebuffer(tcp, direct)
                through = await read_framebuffer(viewer, proxied)
                after = await read_framebuffer(tcp, direct)
                if before == after and len(before.colours()) > 1:  # drawn (xterm is up), still
                    break
            else:
                pytest.fail("the desktop was never drawn and still for three screenshots")

    assert proxied_banner == direct_banner == RFB_VERSION
    assert proxied == direct  # ServerInit: size, pixel format, name
    assert proxied.width > 0
    assert proxied.height > 0
    assert through == before
    assert len(through.colours()) > 1, "the desktop is blank"
    assert env.sample("streamspace_vnc_bytes_total", session_id=sid, direction="to_viewer") >= (
        2 * len(through.pixels)
    )
    assert env.sample("streamspace_vnc_bytes_total", session_id=sid, direction="to_session") > 0
    assert env.sample("streamspace_vnc_stream_open_seconds_count") == 1
    assert env.agent.vnc_streams_requested == 1


VNC_LOG = "streamspace.controlplane.vnc"
"""The viewer route's logger."""
CLI_FORMAT = logging.Formatter("%(levelname)s: %(message)s")
"""How ``streamspace-controlplane serve`` formats log lines."""


def vnc_lines(caplog: pytest.LogCaptureFixture, marker: str) -> list[str]:
    """The proxy's log lines containing ``marker``, formatted as the control plane prints."""
    return [
        CLI_FORMAT.format(r)
        for r in caplog.records
        if r.name == VNC_LOG and marker in r.getMessage()
    ]


@pytest.mark.asyncio
async def test_the_proxy_logs_each_viewer_at_info_as_the_seed_guide_greps_for(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the agent's stream is open, ``INFO: VNC proxy connection established for session
    <id>`` (matched by ``grep vnc`` and ``grep vnc_proxy``), naming the agent and transport;
    on close, a line with the duration and the bytes each way, which match the byte
    counters. Neither names the token."""
    caplog.set_level(logging.INFO, logger=VNC_LOG)
    sid = env.session_id
    transport = env.agent.settings.vnc_transport
    token = await env.token()
    async with env.viewer(token) as ws:
        banner, _ = await rfb_handshake(RfbStream.websocket(ws))
        assert banner == RFB_VERSION
        assert vnc_lines(caplog, "established") == [
            f"INFO: VNC proxy connection established for session {sid} "
            f"(vnc_proxy: agent {AGENT_ID}, transport {transport})"
        ]
        assert vnc_lines(caplog, "closed") == []

    async def closed() -> bool:
        return bool(vnc_lines(caplog, "closed"))

    await eventually(closed, timeout_s=5)
    [line] = vnc_lines(caplog, "closed")
    match = re.fullmatch(
        rf"INFO: VNC proxy connection closed for session {sid} after (\d+\.\d)s "
        r"\(vnc_proxy: (\d+) bytes to the session, (\d+) to the viewer; close 1000\)",
        line,
    )
    assert match, line
    to_session, to_viewer = int(match[2]), int(match[3])
    assert to_session == env.sample(
        "streamspace_vnc_bytes_total", session_id=sid, direction="to_session"
    )
    assert to_viewer == env.sample(
        "streamspace_vnc_bytes_total", session_id=sid, direction="to_viewer"
    )
    assert to_session >= len(RFB_VERSION)
    assert to_viewer >= len(RFB_VERSION)
    assert "vnc" in line
    assert token not in caplog.text


async def _refused(
    env: Env, token: str | None, session_id: str | None = None, **options: Any
) -> int:
    with pytest.raises(InvalidStatus) as caught:
        async with env.viewer(token, session_id, **options):
            pass
    status: int = caught.value.response.status_code
    return status


@pytest.mark.asyncio
async def test_bad_tokens_and_foreign_origins_are_refused_before_the_agent_hears(
    env: Env,
) -> None:
    now = [time.time()]
    env.harness.cp.extras["vnc.tokens"] = VncTokens(env.harness.cp.hub, clock=lambda: now[0])
    bobs_session = await env.start_session(env.bob)

    assert await _refused(env, None) == 403
    assert await _refused(env, "not-a-token") == 403

    expired = await env.token()
    now[0] += 61
    assert await _refused(env, expired) == 403

    bobs = await env.token(bobs_session, env.bob)
    assert await _refused(env, bobs) == 403  # bob's token, alice's session
    assert await _refused(env, bobs, bobs_session) == 403  # used up by the attempt

    good = await env.token()
    assert await _refused(env, good, origin="https://evil.example") == 403
    assert env.agent.vnc_streams_requested == 0

    # The refused Origin did not use the token up; the same host is always allowed.
    host = env.ws_base.removeprefix("ws://")
    async with env.viewer(good, origin=f"http://{host}") as ws:
        banner, _ = await rfb_handshake(RfbStream.websocket(ws))
        assert banner == RFB_VERSION
    assert env.agent.vnc_streams_requested == 1
    assert await _refused(env, good) == 403  # reused
    assert env.agent.vnc_streams_requested == 1


@pytest.mark.asyncio
async def test_token_endpoint_checks_owner_and_state(env: Env) -> None:
    no_auth = await env.http.post(f"/api/v1/sessions/{env.session_id}/vnc-token")
    assert no_auth.status_code == 401
    assert (await env.vnc_token(headers=env.bob)).status_code == 404
    by_admin = await env.vnc_token(headers=env.admin)
    assert by_admin.status_code == 201
    assert by_admin.headers["cache-control"] == "no-store"
    stopped = await env.http.patch(
        f"/api/v1/sessions/{env.session_id}", json={"state": "stopped"}, headers=env.alice
    )
    assert stopped.status_code == 200, stopped.text
    await env.harness.wait_state(env.session_id, "stopped")
    refused = await env.vnc_token()
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "session_not_running"
    document = (await env.http.get("/api/v1/openapi.json")).json()
    assert "post" in document["paths"]["/api/v1/sessions/{session_id}/vnc-token"]


@pytest.mark.asyncio
async def test_two_viewers_get_separate_streams_and_closing_one_closes_its_tcp(
    env: Env,
) -> None:
    async with env.viewer(await env.token()) as first, env.viewer(await env.token()) as second:
        one, two = RfbStream.websocket(first), RfbStream.websocket(second)
        (_, init_one), (_, init_two) = await asyncio.gather(rfb_handshake(one), rfb_handshake(two))
        assert init_one == init_two
        screens = await asyncio.gather(
            read_framebuffer(one, init_one), read_framebuffer(two, init_two)
        )
        assert env.agent.vnc_streams_open == 2
        dedicated = 2 if env.agent.transport.name == "ws-dedicated" else 0
        assert env.sample("streamspace_websocket_connections", kind="agent-stream") == dedicated
        assert env.sample("streamspace_vnc_viewers", session_id=env.session_id) == 2
        await first.close()

        async def one_left() -> bool:
            return env.agent.vnc_streams_open == 1

        await eventually(one_left)
        # The second viewer is untouched: it gets another full update.
        again = await read_framebuffer(two, init_two)
        assert len(again.pixels) == len(screens[1].pixels)

    async def all_closed() -> bool:
        return env.agent.vnc_streams_open == 0 and not env.sample(
            "streamspace_vnc_viewers", session_id=env.session_id
        )

    await eventually(all_closed)
    assert env.agent.vnc_streams_requested == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_idle_viewer_is_closed_after_the_proxy_timeout(
    sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    isolate(monkeypatch)
    async with environment(
        sqlite_store, tmp_path, transport=transport, vnc_proxy_timeout="300ms"
    ) as env:
        async with env.viewer(await env.token()) as ws:
            assert await ws.recv() == RFB_VERSION
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4408
            assert ws.close_reason == "idle for 0.3s"

        async def released() -> bool:
            return env.agent.vnc_streams_open == 0

        await eventually(released)


@pytest.mark.asyncio
async def test_stream_to_a_session_the_agent_lost_is_closed_with_the_reason(env: Env) -> None:
    """The agent refuses (its session is gone behind the control plane's back)."""
    token = await env.token()
    await env.platform.stop(env.session_id, 99)
    async with env.viewer(token) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1011
        assert env.session_id in (ws.close_reason or "")
    assert env.agent.vnc_streams_requested == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("token", ["made-up", ""])
async def test_a_dedicated_dial_without_a_waiting_stream_is_refused(env: Env, token: str) -> None:
    """No socket is accepted at the stream route but for a token a viewer waits on."""
    url = env.ws_base + "/api/v1/agents/vnc/" + token
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=10):
            pass
    assert refused.value.response.status_code in {403, 404}


@pytest.mark.asyncio
async def test_a_dedicated_stream_token_is_single_use(
    sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second dial with a token already used is refused, and the first stream is intact."""
    isolate(monkeypatch)
    async with environment(sqlite_store, tmp_path, transport="ws-dedicated") as env:
        await _dial_twice(env)


async def _dial_twice(env: Env) -> None:
    sent: list[VncOpen] = []
    real = env.agent.transport.open_stream

    async def spy(link: Any, request: VncOpen) -> Any:
        sent.append(request)
        return await real(link, request)

    env.agent.transport.open_stream = spy  # type: ignore[method-assign]
    async with env.viewer(await env.token()) as ws:
        assert await ws.recv() == RFB_VERSION
        assert sent
        assert sent[0].stream_token
        url = env.ws_base + "/api/v1/agents/vnc/" + sent[0].stream_token
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, open_timeout=10):
                pass
        assert refused.value.response.status_code == 403
        await ws.send(RFB_VERSION)
        assert len(await ws.recv()) >= 2  # security types: the stream still works


async def _closed_within(ws: ClientConnection, timeout_s: float = 5.0) -> tuple[int, str]:
    """Wait (at most ``timeout_s``) for the control plane to close the viewer."""

    async def drain() -> None:
        while True:
            await ws.recv()

    async with asyncio.timeout(timeout_s):
        with pytest.raises(ConnectionClosed) as closed:
            await drain()
    rcvd = closed.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


@pytest.mark.asyncio
async def test_stopping_or_deleting_a_session_closes_its_viewers_at_once(env: Env) -> None:
    async with env.viewer(await env.token()) as ws:
        await rfb_handshake(RfbStream.websocket(ws))
        r = await env.http.patch(
            f"/api/v1/sessions/{env.session_id}", json={"state": "stopped"}, headers=env.alice
        )
        assert r.status_code == 200, r.text
        assert await _closed_within(ws) == (4403, "the session is stopping")
    second = await env.start_session(env.alice)
    async with env.viewer(await env.token(second), second) as ws:
        await rfb_handshake(RfbStream.websocket(ws))
        r = await env.http.delete(f"/api/v1/sessions/{second}", headers=env.alice)
        assert r.status_code == 202, r.text
        assert await _closed_within(ws) == (4403, "the session is stopping")


@pytest.mark.asyncio
async def test_deleting_a_user_closes_the_viewers_they_hold(env: Env) -> None:
    r = await env.http.post(
        "/api/v1/users",
        json={"username": "carol", "password": USER_PASSWORD, "role": "admin"},
        headers=env.admin,
    )
    assert r.status_code == 201, r.text
    carol = await _login(env.http, "carol", USER_PASSWORD)
    async with env.viewer(await env.token(headers=carol)) as ws:  # an admin views alice's
        await rfb_handshake(RfbStream.websocket(ws))
        r = await env.http.delete("/api/v1/users/carol", headers=env.admin)
        assert r.status_code == 204, r.text
        assert await _closed_within(ws) == (4403, "the user was deleted")


@pytest.mark.asyncio
async def test_revoking_the_agent_token_disconnects_the_agent_and_its_viewers(env: Env) -> None:
    r = await env.http.get("/api/v1/agent-tokens", headers=env.admin)
    assert r.status_code == 200, r.text
    (token,) = [t for t in r.json() if t["agent_id"] == AGENT_ID and t["revoked_at"] is None]
    async with env.viewer(await env.token()) as ws:
        await rfb_handshake(RfbStream.websocket(ws))
        r = await env.http.delete(f"/api/v1/agent-tokens/{token['token_id']}", headers=env.admin)
        assert r.status_code == 204, r.text
        assert await _closed_within(ws) == (4403, "the agent's token was revoked")

    async def offline() -> bool:
        agent = await env.harness.cp.store.get_agent(AGENT_ID)
        return agent is not None and agent.status == "offline"

    await eventually(offline, timeout_s=5)
    assert env.harness.cp.hub.local(AGENT_ID) is None  # and it cannot come back with it


@pytest.mark.asyncio
async def test_disabling_a_user_closes_their_viewers_and_refuses_new_ones(env: Env) -> None:
    """Their viewer closes with 4403 within 5 s; a VNC token issued before is refused at
    redemption, and none can be issued; the session keeps running."""
    spare = await env.token()  # issued while alice was enabled, redeemed after
    async with env.viewer(await env.token()) as ws:
        await rfb_handshake(RfbStream.websocket(ws))
        r = await env.http.patch("/api/v1/users/alice", json={"disabled": True}, headers=env.admin)
        assert r.status_code == 200, r.text
        assert await _closed_within(ws) == (4403, "the user was disabled")
    assert await _refused(env, spare) == 403
    r = await env.vnc_token()
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "user_disabled"
    session = await env.harness.cp.store.get_session(env.session_id)
    assert session is not None
    assert (session.state, session.desired_state) == ("running", "running")


@pytest.mark.asyncio
async def test_deleting_an_online_agent_disconnects_it_and_its_viewers(env: Env) -> None:
    """Its viewer closes with 4403 within 5 s, its token no longer connects, its session
    is stopped and unplaced, and the agent does not come back."""
    (token,) = [t for t in await env.harness.cp.store.list_agent_tokens(AGENT_ID)]
    async with env.viewer(await env.token()) as ws:
        await rfb_handshake(RfbStream.websocket(ws))
        r = await env.http.delete(f"/api/v1/agents/{AGENT_ID}", headers=env.admin)
        assert r.status_code == 204, r.text
        assert await _closed_within(ws) == (4403, "the agent was deleted")

    async def disconnected() -> bool:
        return env.harness.cp.hub.local(AGENT_ID) is None

    await eventually(disconnected, timeout_s=5)
    revoked = [t for t in await env.harness.cp.store.list_agent_tokens(AGENT_ID)]
    assert [(t.token_id, t.revoked_at is not None) for t in revoked] == [(token.token_id, True)]
    session = await env.harness.cp.store.get_session(env.session_id)
    assert session is not None
    assert (session.state, session.agent_id) == ("stopped", None)
    await asyncio.sleep(0.5)  # the agent retries with a short backoff; each is refused
    assert await env.harness.cp.store.get_agent(AGENT_ID) is None
    assert env.harness.cp.hub.local(AGENT_ID) is None
