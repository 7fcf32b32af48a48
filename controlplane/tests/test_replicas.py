"""Several replicas in one test: three control planes on one PostgreSQL database and one
Redis (the real ones), a real agent with the ``process`` platform on a real Xvnc, held by
replica C and reached through a :class:`TcpBalancer` standing in for the Service.

Requests land on A and viewers on B, so every command and every VNC byte crosses replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from agentsim import Harness, Refused, bind, eventually, fast_settings, serve_control_plane
from pydantic import SecretStr
from test_vnc import VNC_LOG, vnc_lines
from test_vnc import _closed_within as closed_within
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from streamspace_controlplane.store.postgres import PostgresStore
from streamspace_sdk import Agent, AgentSettings
from streamspace_sdk.agent import Backoff
from streamspace_sdk.hooks import Hooks, make_plugin_manager
from streamspace_sdk.platforms import ProcessPlatform
from streamspace_sdk.settings import PluginSettings
from streamspace_sdk.testing import (
    RFB_VERSION,
    RfbStream,
    TcpBalancer,
    read_drawn_framebuffer,
    rfb_handshake,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN_PASSWORD = "admin-password-for-tests"
AGENT_ID = "held-by-c"


@dataclass
class Replica:
    name: str
    harness: Harness
    http: httpx.AsyncClient
    stop: Callable[[], Any]

    @property
    def ws(self) -> str:
        return self.harness.url

    @property
    def port(self) -> int:
        return int(self.ws.rsplit(":", 1)[1])

    def sample(self, name: str, **labels: str) -> float:
        return self.harness.cp.metrics.registry.get_sample_value(name, labels) or 0.0


class Cluster:
    """Starts replicas on one database and one Redis redis_prefix; stops them all at the end."""

    def __init__(self, dsn: str, redis_prefix: str, root: Path) -> None:
        self.dsn, self.redis_prefix, self.root = dsn, redis_prefix, root
        self.stack = contextlib.AsyncExitStack()
        self.replicas: dict[str, Replica] = {}

    async def start(self, name: str) -> Replica:
        sock = bind()
        port = sock.getsockname()[1]
        settings = fast_settings(
            self.root / name,
            agent_hub_backend="redis",
            redis_url=REDIS_URL,
            redis_key_prefix=self.redis_prefix,
            pod_name=name,
            internal_url=f"http://127.0.0.1:{port}",
            replica_timeout="1s",
        )
        store = PostgresStore(self.dsn)
        done = asyncio.Event()
        stopped = asyncio.Event()

        async def run() -> None:
            async with serve_control_plane(settings, store, sock) as harness:
                base = "http" + harness.url.removeprefix("ws")
                async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                    login = await http.post(
                        "/api/v1/auth/login",
                        json={"username": "admin", "password": ADMIN_PASSWORD},
                    )
                    assert login.status_code == 200, login.text
                    http.headers["Authorization"] = f"Bearer {login.json()['token']}"
                    self.replicas[name] = Replica(name, harness, http, done.set)
                    started.set()
                    await done.wait()
            stopped.set()

        started = asyncio.Event()
        task = asyncio.create_task(run(), name=f"replica {name}")
        started_or_failed = asyncio.ensure_future(started.wait())
        await asyncio.wait([task, started_or_failed], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started_or_failed.cancel()
            task.result()  # raises what went wrong
        replica = self.replicas[name]

        async def stop() -> None:
            done.set()
            await task

        replica.stop = stop
        self.stack.push_async_callback(stop)
        return replica


@pytest_asyncio.fixture
async def cluster(fresh_pg_dsn: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    made = Cluster(fresh_pg_dsn, redis_prefix, tmp_path)
    async with made.stack:
        for name in ("a", "b", "c"):
            await made.start(name)
        yield made


@contextlib.asynccontextmanager
async def agent_behind(
    balancer: TcpBalancer, token: str, state: Path, transport: str
) -> AsyncIterator[Agent]:
    """A real agent dialling the balancer (so, first, replica C)."""
    platform = ProcessPlatform(
        ProcessPlatform.Settings(
            process_state_dir=state, process_start_timeout=15.0, process_stop_timeout=1.0
        ),
        agent_id=AGENT_ID,
    )
    agent = Agent(
        AgentSettings(
            agent_id=AGENT_ID,
            control_plane_url=f"ws://127.0.0.1:{balancer.port}",
            agent_token=SecretStr(token),
            health_port=0,
            heartbeat_interval=0.5,
            vnc_transport=transport,
            region="c",
        ),
        platform,
        hooks=Hooks(
            make_plugin_manager(
                settings=PluginSettings(streamspace_load_plugins=""), load_entrypoints=False
            )
        ),
        backoff=Backoff(base_s=0.05, cap_s=0.2, reset_after_s=60.0),
    )
    task = asyncio.create_task(agent.serve())
    try:
        yield agent
    finally:
        await agent.stop()
        await task
        for status in await platform.list_sessions():
            await platform.stop(status.session_id, status.generation + 1)


async def held_by(cluster: Cluster, name: str, agent_id: str = AGENT_ID) -> None:
    """Wait until replica ``name`` holds the agent (and the others know it)."""
    held = cluster.replicas[name].harness.cp.hub

    async def ready() -> bool:
        if held.local(agent_id) is None:
            return False
        for other in cluster.replicas.values():
            if other.name != name:
                where = await other.harness.cp.hub.locate(agent_id)
                if where is None or where.pod != name:
                    return False
        return True

    await eventually(ready, timeout_s=15)


async def vnc_screen(viewer_on: Replica, token_from: Replica, session_id: str) -> tuple[int, int]:
    """Take a token from one replica, view through another until the desktop has drawn;
    return the screen's size."""
    r = await token_from.http.post(f"/api/v1/sessions/{session_id}/vnc-token")
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    async with connect(
        f"{viewer_on.ws}/vnc/{session_id}?token={token}",
        subprotocols=[Subprotocol("binary")],
        compression=None,
        max_size=None,
    ) as ws:
        assert ws.subprotocol == "binary"
        viewer = RfbStream.websocket(ws)
        banner, init = await rfb_handshake(viewer)
        async with asyncio.timeout(30):
            screen = await read_drawn_framebuffer(viewer, init)
    assert banner == RFB_VERSION
    return screen.width, screen.height


@pytest.mark.parametrize("transport", ["ws-mux", "ws-dedicated"])
@pytest.mark.asyncio
async def test_rest_on_a_runs_on_c_and_a_viewer_on_b_sees_the_desktop(
    cluster: Cluster, tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=VNC_LOG)
    a, b, c = (cluster.replicas[n] for n in "abc")
    created = await a.http.post(
        "/api/v1/templates",
        json={"name": "desktop", "display_name": "Desktop", "platform": "process", "region": "c"},
    )
    assert created.status_code == 201, created.text
    r = await a.http.post("/api/v1/agents/held-by-c/tokens")
    assert r.status_code == 201, r.text
    # Round robin: the agent's socket goes to C; a dedicated stream's dial lands on A
    # next, which must forward it to C.
    async with (
        TcpBalancer(
            [("127.0.0.1", c.port), ("127.0.0.1", a.port), ("127.0.0.1", b.port)],
            policy="round-robin",
        ) as balancer,
        agent_behind(balancer, r.json()["token"], tmp_path / "state", transport),
    ):
        await held_by(cluster, "c")
        leader = [x.name for x in (a, b, c) if x.harness.cp.hub.leading()]
        assert leader == ["a"]  # it started first

        r = await a.http.post("/api/v1/sessions", json={"template": "desktop"})
        assert r.status_code == 201, r.text
        session_id = r.json()["id"]
        await a.harness.wait_state(session_id, "running", timeout_s=30)

        width, height = await vnc_screen(b, a, session_id)
        assert width > 0
        assert height > 0
        # B says which replica holds the agent; C serves the viewer as its own.
        c_url = f"http://127.0.0.1:{c.port}"
        assert sorted(vnc_lines(caplog, "established")) == sorted(
            [
                f"INFO: VNC proxy connection established for session {session_id} "
                f"(vnc_proxy: relayed to replica c at {c_url}, which holds agent {AGENT_ID})",
                f"INFO: VNC proxy connection established for session {session_id} "
                f"(vnc_proxy: agent {AGENT_ID}, transport {transport}, "
                "for a viewer relayed from another replica)",
            ]
        )
        assert (
            b.sample("streamspace_vnc_bytes_total", session_id=session_id, direction="to_viewer")
            == 0
        )  # B relayed, C counted
        assert (
            c.sample("streamspace_vnc_bytes_total", session_id=session_id, direction="to_viewer")
            > 0
        )
        if transport == "ws-dedicated":
            assert balancer.accepted[("127.0.0.1", a.port)] >= 1

        # A token is single use on every replica.
        r = await a.http.post(f"/api/v1/sessions/{session_id}/vnc-token")
        token = r.json()["token"]
        async with connect(f"{b.ws}/vnc/{session_id}?token={token}"):
            pass
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{c.ws}/vnc/{session_id}?token={token}"):
                pass
        assert refused.value.response.status_code == 403
        # The relay's own door takes no viewer token and no replayed ticket.
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"{c.ws}/internal/v1/vnc/{session_id}",
                additional_headers={"Authorization": f"Bearer {token}"},
            ):
                pass
        assert refused.value.response.status_code == 403

        # Stop on B, with a viewer relayed by B from C: the command crosses to C, C closes
        # the viewer at once (B passes the close on), the outcome is seen on A.
        r = await a.http.post(f"/api/v1/sessions/{session_id}/vnc-token")
        async with connect(
            f"{b.ws}/vnc/{session_id}?token={r.json()['token']}", compression=None
        ) as viewer:
            assert await viewer.recv() == RFB_VERSION
            r = await b.http.patch(f"/api/v1/sessions/{session_id}", json={"state": "stopped"})
            assert r.status_code in (200, 202), r.text
            assert await closed_within(viewer) == (4403, "the session is stopping")
        await a.harness.wait_state(session_id, "stopped", timeout_s=20)


@pytest.mark.asyncio
async def test_disabling_a_user_or_deleting_the_agent_on_a_closes_viewers_on_b(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The agent is held by C and the viewers relayed by B; A disables the viewer's user,
    then deletes the agent: each viewer closes with 4403 within 5 s, and the agent's
    socket on C closes."""
    a, b, c = (cluster.replicas[n] for n in "abc")
    created = await a.http.post(
        "/api/v1/templates",
        json={"name": "desktop", "display_name": "Desktop", "platform": "process", "region": "c"},
    )
    assert created.status_code == 201, created.text
    r = await a.http.post(
        "/api/v1/users", json={"username": "carol", "password": "carol-password-1"}
    )
    assert r.status_code == 201, r.text
    r = await a.http.post("/api/v1/agents/held-by-c/tokens")
    token = r.json()["token"]
    async with (
        TcpBalancer([("127.0.0.1", c.port)]) as balancer,
        agent_behind(balancer, token, tmp_path / "state", "ws-mux"),
    ):
        await held_by(cluster, "c")
        r = await a.http.post("/api/v1/sessions", json={"template": "desktop", "user": "carol"})
        assert r.status_code == 201, r.text
        session_id = r.json()["id"]
        await a.harness.wait_state(session_id, "running", timeout_s=30)
        login = await b.http.post(
            "/api/v1/auth/login", json={"username": "carol", "password": "carol-password-1"}
        )
        carol = {"Authorization": f"Bearer {login.json()['token']}"}

        r = await b.http.post(f"/api/v1/sessions/{session_id}/vnc-token", headers=carol)
        assert r.status_code == 201, r.text
        async with connect(f"{b.ws}/vnc/{session_id}?token={r.json()['token']}") as viewer:
            assert await viewer.recv() == RFB_VERSION
            r = await a.http.patch("/api/v1/users/carol", json={"disabled": True})
            assert r.status_code == 200, r.text
            assert await closed_within(viewer) == (4403, "the user was disabled")

        r = await b.http.post(f"/api/v1/sessions/{session_id}/vnc-token")  # the admin's
        assert r.status_code == 201, r.text
        async with connect(f"{b.ws}/vnc/{session_id}?token={r.json()['token']}") as viewer:
            assert await viewer.recv() == RFB_VERSION
            r = await a.http.delete(f"/api/v1/agents/{AGENT_ID}")
            assert r.status_code == 204, r.text
            assert await closed_within(viewer) == (4403, "the agent was deleted")

        async def let_go() -> bool:
            return c.harness.cp.hub.local(AGENT_ID) is None

        await eventually(let_go, timeout_s=5)
        r = await b.http.get(f"/api/v1/sessions/{session_id}")
        assert (r.json()["state"], r.json()["agent_id"]) == ("stopped", None)


@pytest.mark.asyncio
async def test_when_c_goes_its_agent_moves_and_commands_and_viewers_follow(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b, c = (cluster.replicas[n] for n in "abc")
    created = await a.http.post(
        "/api/v1/templates",
        json={"name": "desktop", "display_name": "Desktop", "platform": "process", "region": "c"},
    )
    assert created.status_code == 201, created.text
    r = await a.http.post("/api/v1/agents/held-by-c/tokens")
    token = r.json()["token"]
    async with (
        TcpBalancer(
            [("127.0.0.1", c.port), ("127.0.0.1", a.port), ("127.0.0.1", b.port)]
        ) as balancer,
        agent_behind(balancer, token, tmp_path / "state", "ws-mux"),
    ):
        await held_by(cluster, "c")
        r = await b.http.post("/api/v1/sessions", json={"template": "desktop"})
        first = r.json()["id"]
        await b.harness.wait_state(first, "running", timeout_s=30)

        await c.stop()  # C leaves; the Service sends the agent to A
        del cluster.replicas["c"]
        await held_by(cluster, "a")

        r = await b.http.post("/api/v1/sessions", json={"template": "desktop"})
        second = r.json()["id"]
        await b.harness.wait_state(second, "running", timeout_s=30)
        first_now = (await b.http.get(f"/api/v1/sessions/{first}")).json()
        assert first_now["state"] == "running"  # adopted, not restarted
        assert (await vnc_screen(b, b, first))[0] > 0  # B relays to A now
        r = await b.http.patch(f"/api/v1/sessions/{second}", json={"state": "stopped"})
        assert r.status_code in (200, 202), r.text
        await b.harness.wait_state(second, "stopped", timeout_s=20)
    ready = await b.http.get("/ready")
    assert ready.status_code == 200, ready.text


@pytest.mark.asyncio
async def test_a_second_process_of_an_agent_is_refused_on_another_replica(
    cluster: Cluster,
) -> None:
    a, c = cluster.replicas["a"], cluster.replicas["c"]
    first = await c.harness.agent("twin", connect=False)
    await first.connect(instance_id="host-1")
    await held_by(cluster, "c", "twin")
    second = await a.harness.agent("twin", connect=False, token=await c.harness.token("twin"))
    with pytest.raises(Refused) as refused:
        await second.connect(instance_id="host-2")
    assert refused.value.code == 4429
    assert "already connected" in refused.value.reason
    assert c.harness.cp.hub.local("twin") is not None  # the first keeps its socket


@pytest.mark.asyncio
async def test_a_silent_agent_is_closed_by_the_replica_holding_it(cluster: Cluster) -> None:
    b = cluster.replicas["b"]
    assert not b.harness.cp.hub.leading()
    silent = await b.harness.agent("silent", heartbeat=False)
    closed = await silent.wait_closed(timeout_s=15)
    assert closed.code == 4408
    assert "no heartbeat" in closed.reason


@pytest.mark.asyncio
async def test_commands_cross_replicas_with_every_redis_notice_lost(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis pub/sub keeps nothing for a replica that is not listening, so notices can be
    lost. With every notice of every replica lost, a start and a stop requested on A for an
    agent held by C still reach it from the PostgreSQL outbox (each replica looks for due
    commands every second), and each is carried out once."""
    a, c = cluster.replicas["a"], cluster.replicas["c"]
    lost: list[str] = []
    for replica in cluster.replicas.values():

        def lose(_agent_id: str | None, notice: str, _arg: str) -> None:
            lost.append(notice)

        monkeypatch.setattr(replica.harness.cp.hub, "_post", lose)
    created = await a.http.post(
        "/api/v1/templates",
        json={"name": "memory", "display_name": "Memory", "platform": "memory", "region": "c"},
    )
    assert created.status_code == 201, created.text
    sim = await c.harness.agent("on-c", region="c")
    await held_by(cluster, "c", "on-c")
    assert a.harness.cp.hub.leading()  # A places the session, C holds the agent

    r = await a.http.post("/api/v1/sessions", json={"template": "memory"})
    assert r.status_code == 201, r.text
    session_id = r.json()["id"]
    await c.harness.wait_state(session_id, "running", timeout_s=5)
    r = await a.http.patch(f"/api/v1/sessions/{session_id}", json={"state": "stopped"})
    assert r.status_code in (200, 202), r.text
    await c.harness.wait_state(session_id, "stopped", timeout_s=5)

    assert "wake" in lost  # the holder was never told
    assert sim.state.starts == 1
    commands = await c.harness.cp.store.list_commands(session_id=session_id)
    assert [(x.command_type, x.status) for x in commands] == [
        ("start", "completed"),
        ("stop", "completed"),
    ]
