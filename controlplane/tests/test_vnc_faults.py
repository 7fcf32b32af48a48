"""The VNC path under network faults, through two :class:`TcpBalancer` s: one between the
agent and the session's VNC server (a real Xvnc; the session's VNC endpoint points at it),
one between the viewer and the control plane (the viewer dials it). The agent's own socket
goes to the control plane directly. Each test runs on ``ws-mux`` and ``ws-dedicated``.

Expected outcomes, one test each:

- latency, 5-byte slices and a bandwidth cap on the VNC server's side: the viewer still
  completes the RFB handshake and reads a framebuffer update, byte for byte what a direct
  connection to the VNC port gives, only later;
- the VNC server's connection reset mid-update: the viewer is closed at once with
  1000 "the session's VNC server closed", the agent keeps its socket (the same connection
  id), the session stays ``running``, and a new viewer with a new token gets the desktop;
- the VNC server black-holed (nothing comes back, nothing closes): the viewer is closed
  with 4408 once the stream has idled ``VNC_PROXY_TIMEOUT``, never later, and meanwhile the
  agent still starts sessions and serves their viewers; a viewer that leaves first frees
  its stream at once;
- the viewer's connection reset: the control plane and the agent release the stream, and
  the VNC server's connection closes; the agent stays connected;
- a VNC server that stops reading (1 byte a second) while the viewer sends: the agent gives
  up after its stall timeout (60 s; 1 s here) and the viewer is closed with 1000, instead
  of the agent holding the stream until the server reads again.

"Released" means every count of open streams is back to 0: the agent's
(``vnc_streams_open``), the control plane's tunnels and its end of the transport (``ws-mux``
streams on the agent socket, or ``ws-dedicated`` stream sockets), and the VNC balancer's
connections (one ends only when Xvnc has closed its side).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from agentsim import eventually
from apikit import isolate
from test_vnc import AGENT_ID, TRANSPORTS, Env, _closed_within, environment
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from streamspace_controlplane.routes.agents import AgentSocket
from streamspace_controlplane.services.tunnels import tunnels
from streamspace_controlplane.store.base import Store
from streamspace_sdk import AgentSettings
from streamspace_sdk.platform import VncEndpoint
from streamspace_sdk.testing import (
    RFB_VERSION,
    Faults,
    RfbStream,
    TcpBalancer,
    read_framebuffer,
    rfb_handshake,
    rfb_tcp,
)

REGION = (0, 0, 64, 48)
"""The screen region read under a bandwidth cap, its top left 64x48 (12 KiB at 32 bpp):
the whole 1280x800 screen would take a minute at 64 KiB/s."""


@dataclass
class Net:
    env: Env
    vnc: TcpBalancer
    """Between the agent and the VNC server of ``env.session_id``."""
    front: TcpBalancer
    """Between viewers and the control plane."""

    def viewer(self, token: str, session_id: str | None = None) -> Any:
        """Connect a viewer through :attr:`front`."""
        sid = session_id or self.env.session_id
        return connect(
            f"ws://127.0.0.1:{self.front.port}/vnc/{sid}?token={token}",
            subprotocols=[Subprotocol("binary")],
            compression=None,
            max_size=None,
        )

    def open_streams(self) -> dict[str, float]:
        """Every count of open VNC streams, by who holds them."""
        cp = self.env.harness.cp
        conn = cp.hub.local(AGENT_ID)
        assert isinstance(conn, AgentSocket), "the agent is not connected"
        if self.env.agent.transport.name == "ws-mux":
            transport = float(len(conn.mux))
        else:
            transport = self.env.sample("streamspace_websocket_connections", kind="agent-stream")
        return {
            "agent": self.env.agent.vnc_streams_open,
            "control plane tunnels": len(tunnels(cp)),
            "control plane transport": transport,
            "vnc server connections": self.vnc.connections,
        }

    async def released(self, timeout_s: float = 5.0) -> None:
        """Wait until every count of :meth:`open_streams` is 0."""

        async def none_open() -> bool:
            return not any(self.open_streams().values())

        try:
            await eventually(none_open, timeout_s=timeout_s)
        except TimeoutError:
            pytest.fail(f"streams still open after {timeout_s}s: {self.open_streams()}")


@contextlib.asynccontextmanager
async def faulty_net(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str, **overrides: Any
) -> AsyncIterator[Net]:
    isolate(monkeypatch)
    for name in AgentSettings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    async with environment(store, tmp_path, transport=transport, **overrides) as env:
        port = int(env.harness.url.rsplit(":", 1)[1])
        direct = await env.vnc_port()
        async with (
            TcpBalancer([("127.0.0.1", direct)]) as vnc,
            TcpBalancer([("127.0.0.1", port)]) as front,
        ):
            real = env.platform.vnc_endpoint

            async def through_balancer(session_id: str) -> VncEndpoint:
                if session_id == env.session_id:
                    return VncEndpoint(host="127.0.0.1", port=vnc.port)
                return await real(session_id)

            monkeypatch.setattr(env.platform, "vnc_endpoint", through_balancer)
            yield Net(env, vnc, front)


@pytest_asyncio.fixture(params=TRANSPORTS)
async def net(
    sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: Any
) -> AsyncIterator[Net]:
    async with faulty_net(sqlite_store, tmp_path, monkeypatch, request.param) as made:
        yield made


@pytest.mark.asyncio
async def test_latency_slicing_and_a_bandwidth_cap_slow_the_desktop_but_keep_it_intact(
    net: Net,
) -> None:
    """What a viewer reads through a slow, chopped network equals what the VNC port gives.

    The desktop may still be drawing, so the region is compared once two direct reads taken
    around the faulted one agree.
    """
    cap = 64 * 1024
    async with rfb_tcp("127.0.0.1", await net.env.vnc_port()) as tcp:
        banner, server_init = await rfb_handshake(tcp)
        net.vnc.faults = Faults(latency_s=0.02, slice_bytes=5, bytes_per_s=cap)
        async with net.viewer(await net.env.token()) as ws:
            viewer = RfbStream.websocket(ws)
            t0 = time.monotonic()
            faulted_banner, faulted_init = await rfb_handshake(viewer)
            handshake_s = time.monotonic() - t0
            for _ in range(5):
                before = await read_framebuffer(tcp, server_init, region=REGION)
                t0 = time.monotonic()
                through = await read_framebuffer(viewer, faulted_init, region=REGION)
                update_s = time.monotonic() - t0
                after = await read_framebuffer(tcp, server_init, region=REGION)
                if before == after:
                    break
            else:
                pytest.fail("the desktop never held still for three reads")
    assert faulted_banner == banner == RFB_VERSION
    assert faulted_init == server_init
    assert through == before
    assert any(through.pixels), "the region is blank: nothing to tell a garbled update by"
    # Four round trips of 20 ms each way (version, security, its result, ServerInit).
    assert handshake_s >= 4 * 2 * 0.02
    assert update_s >= len(through.pixels) / cap * 0.9, "the bandwidth cap did not apply"
    assert update_s < 5
    await net.released()


@pytest.mark.asyncio
async def test_a_vnc_server_reset_closes_the_viewer_and_spares_the_agent_and_session(
    net: Net,
) -> None:
    first = net.env.agent.connection_id
    assert first is not None
    net.vnc.faults.reset_after_bytes = 4096  # past the handshake, inside the first update
    async with net.viewer(await net.env.token()) as ws:
        viewer = RfbStream.websocket(ws)
        _, before = await rfb_handshake(viewer)
        t0 = time.monotonic()
        with pytest.raises(EOFError, match="the WebSocket closed with 1000"):
            await asyncio.wait_for(read_framebuffer(viewer, before), 5)
        closed_s = time.monotonic() - t0
        code, reason = await _closed_within(ws)
    assert (code, reason) == (1000, "the session's VNC server closed")
    assert closed_s < 2
    await net.released()
    assert net.env.agent.connection_id == first
    session = await net.env.harness.cp.store.get_session(net.env.session_id)
    assert session is not None
    assert session.state == "running"

    net.vnc.faults = Faults()
    async with net.viewer(await net.env.token()) as ws:
        viewer = RfbStream.websocket(ws)
        banner, server_init = await rfb_handshake(viewer)
        assert banner == RFB_VERSION
        assert server_init == before
        screen = await read_framebuffer(viewer, server_init)
        assert len(screen.pixels) == 4 * before.width * before.height
    await net.released()
    assert net.env.agent.connection_id == first


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_black_holed_vnc_server_is_closed_as_idle_and_spares_other_sessions(
    sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    idle_s = 1.5
    async with faulty_net(
        sqlite_store, tmp_path, monkeypatch, transport, vnc_proxy_timeout=f"{idle_s}s"
    ) as net:
        first = net.env.agent.connection_id
        net.vnc.faults.black_hole = True
        token = await net.env.token()
        t0 = time.monotonic()  # before the stream opens, so before its idle clock starts
        async with net.viewer(token) as ws:
            # Meanwhile the agent starts another session, and its viewer gets the desktop.
            other = await net.env.start_session(net.env.alice)
            async with net.viewer(await net.env.token(other), other) as second:
                banner, _ = await rfb_handshake(RfbStream.websocket(second))
                assert banner == RFB_VERSION
            code, reason = await _closed_within(ws, timeout_s=idle_s + 5)
            closed_s = time.monotonic() - t0
        assert (code, reason) == (4408, f"idle for {idle_s:g}s")
        assert idle_s <= closed_s < idle_s + 2
        await net.released()
        assert net.env.agent.connection_id == first


@pytest.mark.asyncio
async def test_a_viewer_leaving_a_black_holed_stream_frees_it_at_once(net: Net) -> None:
    net.vnc.faults.black_hole = True
    async with net.viewer(await net.env.token()):

        async def opened() -> bool:
            return net.env.agent.vnc_streams_open == 1 and net.vnc.connections == 1

        await eventually(opened, timeout_s=5)
        t0 = time.monotonic()
    await net.released(timeout_s=2)
    assert time.monotonic() - t0 < 2


@pytest.mark.asyncio
async def test_a_viewer_reset_releases_the_stream_and_the_vnc_connection(net: Net) -> None:
    first = net.env.agent.connection_id
    async with net.viewer(await net.env.token()) as ws:
        banner, _ = await rfb_handshake(RfbStream.websocket(ws))
        assert banner == RFB_VERSION
        assert net.open_streams() == {
            "agent": 1,
            "control plane tunnels": 1,
            "control plane transport": 1,
            "vnc server connections": 1,
        }
        t0 = time.monotonic()
        assert net.front.cut() == 1
        await net.released(timeout_s=5)
        released_s = time.monotonic() - t0
    assert released_s < 2
    assert net.env.agent.connection_id == first
    sid = net.env.session_id
    assert not net.env.sample("streamspace_vnc_viewers", session_id=sid)


@pytest.mark.asyncio
async def test_a_vnc_server_that_stops_reading_is_given_up_after_the_stall_timeout(
    net: Net,
) -> None:
    """A viewer's input piles up before a server that takes 1 byte a second (hung, or
    behind a network dropping packets): the agent gives up after its stall timeout, and
    the viewer is closed. Xvnc's side is not counted: the throttled balancer holds it."""
    stall_s = 1.0
    net.env.agent._vnc.stall_timeout_s = stall_s
    first = net.env.agent.connection_id
    async with net.viewer(await net.env.token()) as ws:
        await rfb_handshake(RfbStream.websocket(ws))
        net.vnc.faults = Faults(bytes_per_s=1.0, slice_bytes=1)
        pointer = struct.pack(">BBHH", 5, 0, 10, 10)  # PointerEvent: harmless, 6 bytes

        async def move_forever() -> None:
            while True:
                await ws.send(pointer * 10_000)

        t0 = time.monotonic()
        mover = asyncio.create_task(move_forever())
        try:
            code, reason = await _closed_within(ws, timeout_s=stall_s + 5)
        finally:
            mover.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await mover
        closed_s = time.monotonic() - t0
    assert (code, reason) == (1000, "the session's VNC server closed")
    assert stall_s <= closed_s < stall_s + 3

    async def released() -> bool:
        counts = net.open_streams()
        del counts["vnc server connections"]
        return not any(counts.values())

    await eventually(released, timeout_s=2)
    assert net.env.agent.connection_id == first
