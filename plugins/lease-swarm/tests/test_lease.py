"""The swarm lease against a real single-node Swarm: conformance, CAS, bad inputs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import Any

import docker
import hypothesis
import pytest
from conftest import DOCKER_HOST, RUN

from streamspace_lease_swarm import LABEL_PREFIX, SwarmLease
from streamspace_lease_swarm.lease import _Conflict
from streamspace_sdk.clock import Clock, SystemClock
from streamspace_sdk.errors import ConfigError, LeaseError, LeaseLost
from streamspace_sdk.lease import Lease
from streamspace_sdk.settings import load_settings
from streamspace_sdk.testing import ElectionMachine, LeaseConformance, LeaseFactory


class TestSwarmLeaseConformance(LeaseConformance):
    @pytest.fixture
    def lease_factory(self, lease_key: str) -> LeaseFactory:
        config = SwarmLease.Settings(docker_host=DOCKER_HOST, lease_key=lease_key)
        return lambda clock: SwarmLease(config, clock=clock)


def make(lease_key: str, clock: Clock | None = None, **values: Any) -> SwarmLease:
    base: dict[str, Any] = {"docker_host": DOCKER_HOST, "lease_key": lease_key}
    settings = SwarmLease.Settings(**(base | values))
    return SwarmLease(settings, clock=clock or SystemClock())


@pytest.mark.asyncio
async def test_the_lease_is_the_labels_of_a_versioned_config(
    engine: docker.APIClient, lease_key: str
) -> None:
    lease = make(lease_key)
    record = await lease.try_acquire("replica-a", 15)
    assert record is not None
    (row,) = engine.configs(filters={"name": f"streamspace-lease-{lease_key}"})
    labels = row["Spec"]["Labels"]
    assert labels[LABEL_PREFIX + "holder"] == "replica-a"
    assert labels[LABEL_PREFIX + "epoch"] == str(record.epoch)
    assert labels[LABEL_PREFIX + "expires"] == record.expires_at.isoformat()
    version = row["Version"]["Index"]
    await lease.renew("replica-a", 15)
    (after,) = engine.configs(filters={"name": f"streamspace-lease-{lease_key}"})
    assert after["Version"]["Index"] > version, "every change is a new version in Raft"
    await lease.close()


@pytest.mark.asyncio
async def test_a_new_lease_starts_its_epoch_from_the_clock(lease_key: str) -> None:
    """The control plane refuses lower epochs: a lease made again must not count from 1."""
    clock = SystemClock()
    lease = make(lease_key, clock)
    record = await lease.try_acquire("a", 15)
    assert record is not None
    assert record.epoch >= int(clock.now().timestamp() * 1000) - 60_000
    await lease.close()


@pytest.mark.asyncio
async def test_a_stale_writer_is_refused_by_the_engine(
    engine: docker.APIClient, lease_key: str
) -> None:
    """Two writers that read the same version: the engine takes one write, refuses the other."""
    a, b = make(lease_key), make(lease_key)
    await a.try_acquire("a", 15)
    await a.release("a")
    found = await a._load()
    assert found is not None
    stale = dict(found)
    winner = await b.try_acquire("b", 15)
    assert winner is not None
    with pytest.raises(_Conflict):
        await a._store(stale, winner.model_copy(update={"holder": "a"}))
    read = await a.read()
    assert read is not None
    assert read.holder == "b"
    await a.close()
    await b.close()


@pytest.mark.asyncio
async def test_processes_contending_at_once_get_one_winner(lease_key: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from streamspace_lease_swarm import SwarmLease
        async def main():
            lease = SwarmLease(SwarmLease.Settings(docker_host={DOCKER_HOST!r},
                                                   lease_key={lease_key!r}))
            record = await lease.try_acquire(sys.argv[1], 30)
            print("won" if record else "lost", record.epoch if record else 0)
            await lease.close()
        asyncio.run(main())
        """
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, f"p{i}", stdout=subprocess.PIPE
        )
        for i in range(4)
    ]
    outputs = [(await p.communicate())[0].decode().split() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert [o[0] for o in outputs].count("won") == 1, outputs


@pytest.mark.asyncio
async def test_mangled_labels_read_as_free_above_the_old_epoch(
    engine: docker.APIClient, lease_key: str
) -> None:
    lease = make(lease_key)
    first = await lease.try_acquire("a", 15)
    assert first is not None
    found = await lease._load()
    assert found is not None
    spec = {**found["Spec"], "Labels": {LABEL_PREFIX + "holder": "a", LABEL_PREFIX + "epoch": "x"}}
    url = f"{engine.base_url}/v{engine.api_version}/configs/{found['ID']}/update"
    response = engine.post(url, json=spec, params={"version": found["Version"]["Index"]})
    assert response.status_code == 200, response.text
    second = await lease.try_acquire("b", 15)
    assert second is not None, "an unreadable lease is free"
    assert second.epoch > first.epoch
    await lease.close()


@pytest.mark.asyncio
async def test_no_engine_is_a_clear_error(lease_key: str) -> None:
    """No engine at all: the error names DOCKER_HOST."""
    lease = make(lease_key, docker_host="unix:///nonexistent/docker.sock")
    with pytest.raises(LeaseError, match="did not answer"):
        await lease.try_acquire("a", 15)
    await lease.close()


@pytest.mark.asyncio
async def test_an_engine_that_is_no_manager_is_a_clear_error(
    standalone_engine: str, lease_key: str
) -> None:
    lease = make(lease_key, docker_host=standalone_engine)
    with pytest.raises(LeaseError, match=r"needs a Docker Swarm manager.*docker swarm init"):
        await lease.try_acquire("a", 15)
    with pytest.raises(LeaseError, match="needs a Docker Swarm manager"):
        await lease.read()
    await lease.close()


@pytest.mark.asyncio
async def test_renew_after_a_takeover_is_lost(lease_key: str) -> None:
    a, b = make(lease_key), make(lease_key)
    await a.try_acquire("a", 15)
    await a.release("a")
    await b.try_acquire("b", 15)
    with pytest.raises(LeaseLost):
        await a.renew("a", 15)
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LEASE_KEY", "no spaces please"), ("DOCKER_HOST", "ftp://manager")],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings(SwarmLease.Settings)


class SwarmElection(ElectionMachine):
    def make_lease(self, clock: Clock, key: str) -> Lease:
        return make(f"t{RUN}-{key}", clock)


TestSwarmElection = SwarmElection.TestCase
TestSwarmElection.settings = hypothesis.settings(
    max_examples=8, stateful_step_count=15, deadline=None
)
