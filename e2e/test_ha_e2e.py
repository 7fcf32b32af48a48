"""Issue 7, end to end: three replicas of one agent elect a leader over each lease backend,
and no session is lost when the leader is killed, stopped or frozen.

Per backend (``file``, ``redis``: the ``process`` platform on one shared state directory;
``swarm``: the ``docker`` platform on this host's single-node swarm; ``kubernetes``, issue 8:
the ``process`` platform with the Lease on the k8s plugin's fake API server):

1. exactly one replica registers; the others follow it;
2. SIGKILL of the leader: another registers within LEASE_DURATION + RETRY_PERIOD + 2 s;
3. SIGTERM of the leader: it releases the lease, and another registers within 2 s;
4. SIGSTOP of the leader past its lease: another takes over; after SIGCONT the old one
   stops acting (it follows) and the control plane keeps the new one;

while one session runs throughout, adopted by each new leader, never reported stopped.
Replicas that die are replaced, as an orchestrator would, so three contend at each step.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import redis
import websockets
from conftest import (
    ADMIN_PASSWORD,
    Agent,
    Agents,
    ControlPlane,
    EventWatch,
    create_session,
    docker_engine,
    eventually,
)

from streamspace_docker.image import DESKTOP_IMAGE
from streamspace_sdk.platform import Capacity
from streamspace_sdk.protocol import AgentHello, AgentWelcome, dump_frame, parse_frame

pytestmark = pytest.mark.asyncio

LEASE_S = 3.0
RETRY_S = 0.5
TIMING = {"LEASE_DURATION": "3s", "RENEW_DEADLINE": "2s", "RETRY_PERIOD": "500ms"}
NEVER = ("stopping", "stopped", "failed")
HA_AGENT = "ha-agent"
RUN = uuid.uuid4().hex[:8]


@pytest.fixture
def cp_env() -> dict[str, str]:
    """A grace period that outlasts a failover, so sessions never go lost."""
    return {"LOST_GRACE_PERIOD": "60s"}


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.APIClient]:
    with docker_engine(f"ssha{RUN}", f"streamspace-lease-ha{RUN}") as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def _redis_keys() -> Iterator[None]:
    """Remove the redis leases this module made."""
    yield
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    for key in client.scan_iter(f"lease:ha{RUN}*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The k8s plugin's fake API server (its test double); yields a kubeconfig for it."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "k8s" / "tests"))
    try:
        from fakeapi import FakeApiServer
    finally:
        sys.path.pop(0)
    server = FakeApiServer(prefix=f"ssha{RUN}k")
    server.start()
    server.add_namespace("streamspace")
    try:
        yield server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    finally:
        server.stop()


def backend_env(backend: str, tmp_path: Path, kubeconfig: Path | None = None) -> dict[str, str]:
    key = f"ha{RUN}-{uuid.uuid4().hex[:6]}"
    common = {"ENABLE_HA": "true", "HA_BACKEND": backend, **TIMING}
    if backend == "file":
        return common | {"LEASE_FILE": str(tmp_path / "lease" / "agent-lease")}
    if backend == "redis":
        return common | {"REDIS_URL": "redis://127.0.0.1:6379/0", "LEASE_KEY": key}
    if backend == "kubernetes":
        assert kubeconfig is not None
        return common | {
            "KUBECONFIG": str(kubeconfig),
            "LEASE_LOCK_NAME": key.lower(),
            "LEASE_LOCK_NAMESPACE": "streamspace",
        }
    return common | {
        "LEASE_KEY": key,
        "PLATFORM": "docker",
        "DOCKER_HOST": "unix:///var/run/docker.sock",
        "NETWORK_PREFIX": f"ssha{RUN}",
        "IMAGE_PULL_POLICY": "Never",
    }


async def template(admin: httpx.AsyncClient, backend: str) -> str:
    body: dict[str, Any] = {"name": "ha-desktop", "display_name": "HA desktop"}
    if backend == "swarm":
        body |= {"platform": "docker", "image": DESKTOP_IMAGE}
    else:
        body |= {"platform": "process"}
    r = await admin.post("/api/v1/templates", json=body)
    assert r.status_code == 201, r.text
    return "ha-desktop"


class Replicas:
    """Three agent processes with one AGENT_ID; dead ones are replaced on request."""

    def __init__(self, agents: Agents, env: dict[str, str], state_dir: Path) -> None:
        self.agents = agents
        self.env = env
        self.state_dir = state_dir
        self.live: list[Agent] = []

    async def start(self, count: int = 1) -> None:
        for _ in range(count):
            agent = await self.agents.start(HA_AGENT, self.state_dir, ready=False, env=self.env)
            self.live.append(agent)

    async def roles(self) -> list[tuple[Agent, dict[str, Any]]]:
        """Each live replica with the body of its ``/ready``."""
        return [(agent, (await agent.readiness())[1]) for agent in self.live]

    async def leader(self, *, not_: Agent | None = None, timeout_s: float = 20.0) -> Agent:
        """Wait until exactly one live replica is registered (and it is not ``not_``)."""
        chosen: list[Agent] = []

        async def one() -> bool:
            roles = await self.roles()
            leaders = [(a, b) for a, b in roles if b.get("role") == "leader"]
            registered = [a for a, b in leaders if b_connected(b)]
            chosen[:] = registered
            return len(leaders) == 1 and len(registered) == 1 and registered[0] is not not_

        await eventually(one, "exactly one registered leader", timeout_s)
        return chosen[0]

    def forget(self, agent: Agent) -> None:
        self.live.remove(agent)


def led_epochs(agent: Agent) -> list[int]:
    """The fencing epochs ``agent`` led with, from its log."""
    return [int(m) for m in re.findall(r"Leading with fencing epoch (\d+)", agent.log_text())]


async def hello_refused(cp: ControlPlane, agent: Agent, epoch: int) -> tuple[int, str]:
    """Register as ``agent`` with ``epoch`` over a raw socket; return the close code and reason."""
    hello = AgentHello(
        agent_id=agent.agent_id,
        platform="process",
        capacity=Capacity(max_sessions=1),
        fencing_epoch=epoch,
        lease_holder="a deposed leader",
    )
    headers = {"Authorization": f"Bearer {agent.token}"}
    async with websockets.connect(
        f"{cp.ws_url}/api/v1/agents/connect", additional_headers=headers
    ) as ws:
        await ws.send(dump_frame(hello))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await frames_until_closed(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def frames_until_closed(ws: websockets.ClientConnection) -> None:
    while True:
        frame = parse_frame(await asyncio.wait_for(ws.recv(), 10))
        assert not isinstance(frame, AgentWelcome), "a stale epoch was welcomed"


def b_connected(body: dict[str, Any]) -> bool:
    return body.get("status") == "ready" and bool(body.get("connection_id"))


async def agent_row(admin: httpx.AsyncClient) -> dict[str, Any]:
    r = await admin.get(f"/api/v1/agents/{HA_AGENT}")
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("backend", ["file", "redis", "swarm", "kubernetes"])
async def test_three_replicas_fail_over_without_losing_the_session(
    cp: ControlPlane,
    admin: httpx.AsyncClient,
    agents: Agents,
    engine: docker.APIClient,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    assert ADMIN_PASSWORD
    kubeconfig = request.getfixturevalue("apiserver") if backend == "kubernetes" else None
    env = backend_env(backend, tmp_path, kubeconfig)
    replicas = Replicas(agents, env, tmp_path / "state")
    await replicas.start(3)
    leader = await replicas.leader()
    followers = [a for a in replicas.live if a is not leader]

    async def others_follow() -> bool:
        bodies = [b for a, b in await replicas.roles() if a is not leader]
        return all(b.get("role") == "follower" and b.get("leader") for b in bodies)

    await eventually(others_follow, "the other two replicas to follow the leader")
    assert "This agent is a FOLLOWER" in followers[0].log_text()

    sid = await create_session(admin, await template(admin, backend))
    async with EventWatch(admin, sid) as watch:
        await watch.wait_for("running", timeout_s=60)

        # 2. SIGKILL: the lease expires, another replica takes over and adopts the session.
        killed_at = time.monotonic()
        leader.kill()
        replicas.forget(leader)
        leader = await replicas.leader(timeout_s=LEASE_S + RETRY_S + 2 + 10)
        took_s = time.monotonic() - killed_at
        assert took_s < LEASE_S + RETRY_S + 2, f"takeover after SIGKILL took {took_s:.1f}s"
        await replicas.start(1)

        # 3. SIGTERM: the leader releases the lease; the handover is quick.
        stopped_at = time.monotonic()
        leader.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        old = leader
        replicas.forget(old)
        leader = await replicas.leader(not_=old, timeout_s=10)
        took_s = time.monotonic() - stopped_at
        assert took_s < 2.0, f"handover after SIGTERM took {took_s:.1f}s"
        assert "Released leader lease" in old.log_text()
        old.stop()
        await replicas.start(1)

        # 4. SIGSTOP past the lease: another leads; after SIGCONT the old one stands down.
        frozen = leader
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            leader = await replicas.leader(not_=frozen, timeout_s=LEASE_S + RETRY_S + 10)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)

        async def stood_down() -> bool:
            _status, body = await frozen.readiness()
            return body.get("role") == "follower"

        await eventually(stood_down, "the thawed old leader to follow", 15)
        assert (await replicas.leader()) is leader, "the control plane must keep the new leader"
        text = frozen.log_text()
        assert "no longer the LEADER" in text or "Stepping down" in text, text[-2000:]
        # The control plane holds the new leader's epoch and refuses the old one's.
        old_epoch, new_epoch = led_epochs(frozen)[-1], led_epochs(leader)[-1]
        assert new_epoch > old_epoch
        assert (await agent_row(admin))["fencing_epoch"] == new_epoch
        code, reason = await hello_refused(cp, frozen, old_epoch)
        assert code == 4409, (code, reason)
        assert f"stale fencing epoch {old_epoch} < {new_epoch}" in reason

        r = await admin.get(f"/api/v1/sessions/{sid}")
        assert r.json()["state"] == "running", r.json()
        assert not set(watch.states) & set(NEVER), watch.history()
