"""The kubernetes lease through the real client against the fake API server."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from conftest import NAMESPACE
from fakeapi import FakeApiServer

from streamspace_k8s import KubernetesLease
from streamspace_sdk.clock import Clock, SystemClock
from streamspace_sdk.errors import ConfigError, LeaseError, LeaseLost
from streamspace_sdk.lease import Lease
from streamspace_sdk.settings import load_settings
from streamspace_sdk.testing import ElectionMachine, FakeClock, LeaseConformance, LeaseFactory


def lease_settings(kubeconfig: Path, name: str, **values: Any) -> KubernetesLease.Settings:
    base: dict[str, Any] = {
        "kubeconfig": str(kubeconfig),
        "lease_lock_name": name,
        "lease_lock_namespace": NAMESPACE,
        "kube_api_timeout": 5,
    }
    return KubernetesLease.Settings(**(base | values))


@pytest.fixture
def lease_name() -> str:
    return f"lease-{uuid.uuid4().hex[:10]}"


class TestKubernetesLeaseConformance(LeaseConformance):
    @pytest.fixture
    def lease_factory(self, kubeconfig: Path, lease_name: str) -> LeaseFactory:
        config = lease_settings(kubeconfig, lease_name)
        return lambda clock: KubernetesLease(config, clock=clock)


_ELECTION_KUBECONFIG: list[Path] = []


class KubernetesElection(ElectionMachine):
    def make_lease(self, clock: Clock, key: str) -> Lease:
        return KubernetesLease(
            lease_settings(_ELECTION_KUBECONFIG[0], f"election-{key}"), clock=clock
        )


TestKubernetesElection = KubernetesElection.TestCase
TestKubernetesElection.settings = hypothesis.settings(
    max_examples=8, stateful_step_count=20, deadline=None
)


@pytest.fixture(autouse=True)
def _election_kubeconfig(kubeconfig: Path) -> None:
    _ELECTION_KUBECONFIG[:] = [kubeconfig]


def make(kubeconfig: Path, name: str, clock: Clock | None = None, **values: Any) -> KubernetesLease:
    return KubernetesLease(lease_settings(kubeconfig, name, **values), clock=clock or FakeClock())


@pytest.mark.asyncio
async def test_the_lease_object_has_client_go_fields(
    apiserver: FakeApiServer, kubeconfig: Path, lease_name: str
) -> None:
    clock = FakeClock()
    lease = make(kubeconfig, lease_name, clock)
    record = await lease.try_acquire("agent-0-abc", 15)
    assert record is not None
    stored = apiserver.get("coordination.k8s.io", "leases", NAMESPACE, lease_name)
    assert stored is not None
    spec = stored["spec"]
    assert spec["holderIdentity"] == "agent-0-abc"
    assert spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == record.epoch
    assert spec["acquireTime"] == spec["renewTime"] == "2026-01-01T00:00:00.000000Z"
    version = stored["metadata"]["resourceVersion"]
    await clock.advance(5)
    renewed = await lease.renew("agent-0-abc", 15)
    after = apiserver.get("coordination.k8s.io", "leases", NAMESPACE, lease_name)
    assert after is not None
    assert int(after["metadata"]["resourceVersion"]) > int(version)
    assert after["spec"]["renewTime"] == "2026-01-01T00:00:05.000000Z"
    assert after["spec"]["acquireTime"] == spec["acquireTime"], "a renewal keeps acquireTime"
    assert renewed.epoch == record.epoch
    await lease.release("agent-0-abc")
    released = apiserver.get("coordination.k8s.io", "leases", NAMESPACE, lease_name)
    assert released is not None
    assert released["spec"]["holderIdentity"] == ""
    assert released["spec"]["leaseTransitions"] == record.epoch
    other = await make(kubeconfig, lease_name, clock).try_acquire("agent-1-def", 15)
    assert other is not None
    assert other.epoch == record.epoch + 1, "leaseTransitions grows at a change of holder"
    await lease.close()


@pytest.mark.asyncio
async def test_a_new_lease_starts_its_epoch_high(kubeconfig: Path, lease_name: str) -> None:
    """The control plane refuses lower epochs: a re-created Lease must not count from 1."""
    record = await make(kubeconfig, lease_name).try_acquire("a", 15)
    assert record is not None
    assert record.epoch > 100_000_000
    assert record.epoch < 2**31, "leaseTransitions is an int32"


@pytest.mark.asyncio
async def test_a_write_carries_the_resource_version_it_read(
    apiserver: FakeApiServer, kubeconfig: Path, lease_name: str
) -> None:
    """A write that loses the race is a 409 from the server, and the loser does not win."""
    clock = FakeClock()
    a, b = make(kubeconfig, lease_name, clock), make(kubeconfig, lease_name, clock)
    assert await a.try_acquire("a", 15) is not None
    await clock.advance(16)
    stale = await b._get()  # b reads the expired record...
    assert stale is not None
    assert await a.try_acquire("a", 15) is not None  # ...a renews in between
    from streamspace_k8s.lease import _Conflict

    now = clock.now()
    with pytest.raises(_Conflict):
        await b._write(stale, "b", 99, now, now, 15)
    assert ("update", "coordination.k8s.io", "leases") in apiserver.calls
    assert await b.try_acquire("b", 15) is None, "after the conflict b sees a holds it"
    record = await b.read()
    assert record is not None
    assert record.holder == "a"


@pytest.mark.asyncio
async def test_renew_after_takeover_is_lost(kubeconfig: Path, lease_name: str) -> None:
    clock = FakeClock()
    a, b = make(kubeconfig, lease_name, clock), make(kubeconfig, lease_name, clock)
    await a.try_acquire("a", 2)
    await clock.advance(3)
    assert await b.try_acquire("b", 2) is not None
    with pytest.raises(LeaseLost, match="no longer holds"):
        await a.renew("a", 2)


@pytest.mark.asyncio
async def test_fractional_durations_round_up(
    apiserver: FakeApiServer, kubeconfig: Path, lease_name: str
) -> None:
    lease = make(kubeconfig, lease_name)
    record = await lease.try_acquire("a", 1.5)
    assert record is not None
    stored = apiserver.get("coordination.k8s.io", "leases", NAMESPACE, lease_name)
    assert stored is not None
    assert stored["spec"]["leaseDurationSeconds"] == 2
    assert (record.expires_at - record.renewed_at).total_seconds() == 2


@pytest.mark.asyncio
async def test_no_cluster_is_a_clear_lease_error(tmp_path: Path, lease_name: str) -> None:
    from fakeapi import free_port

    config = tmp_path / "config"
    config.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "x",'
        f'"clusters": [{{"name": "x", "cluster": {{"server": "http://127.0.0.1:{free_port()}"}}}}],'
        '"users": [{"name": "u", "user": {"token": "t"}}],'
        '"contexts": [{"name": "x", "context": {"cluster": "x", "user": "u"}}]}'
    )
    lease = make(config, lease_name, SystemClock())
    with pytest.raises(LeaseError, match="did not answer"):
        await lease.try_acquire("a", 15)


@pytest.mark.asyncio
async def test_a_missing_kubeconfig_is_a_clear_lease_error(tmp_path: Path, lease_name: str) -> None:
    lease = make(tmp_path / "nothing-here", lease_name)
    with pytest.raises(LeaseError, match="cannot configure the Kubernetes client"):
        await lease.read()


@pytest.mark.asyncio
async def test_forbidden_names_the_rbac(
    apiserver: FakeApiServer, kubeconfig: Path, lease_name: str
) -> None:
    apiserver.forbid("create", "coordination.k8s.io", "leases")
    try:
        with pytest.raises(LeaseError, match=r"forbidden.*rbac\.yaml"):
            await make(kubeconfig, lease_name).try_acquire("a", 15)
    finally:
        apiserver.forbidden.clear()


@pytest.mark.asyncio
async def test_missing_namespace_is_named(kubeconfig: Path, lease_name: str) -> None:
    lease = make(kubeconfig, lease_name, lease_lock_namespace="nowhere")
    with pytest.raises(LeaseError, match="LEASE_LOCK_NAMESPACE=nowhere"):
        await lease.try_acquire("a", 15)


def test_settings_use_the_seed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASE_LOCK_NAME", "my-agent-leader")
    monkeypatch.setenv("LEASE_LOCK_NAMESPACE", "agents")
    config = load_settings(KubernetesLease.Settings)
    assert (config.lease_lock_name, config.lease_lock_namespace) == ("my-agent-leader", "agents")
    monkeypatch.delenv("LEASE_LOCK_NAME")
    monkeypatch.delenv("LEASE_LOCK_NAMESPACE")
    default = load_settings(KubernetesLease.Settings)
    assert default.lease_lock_name == "k8s-agent-leader"
    assert default.lease_lock_namespace == "streamspace"
    monkeypatch.setenv("LEASE_LOCK_NAME", "Not_A_Name")
    with pytest.raises(ConfigError, match="LEASE_LOCK_NAME"):
        load_settings(KubernetesLease.Settings)
