"""PlatformConformance and LeaseConformance against a real cluster."""

from __future__ import annotations

import uuid

import pytest
from conftest import IMAGE, KUBECONFIG

from streamspace_k8s import KubernetesLease, KubernetesPlatform
from streamspace_sdk.platform import SessionSpec
from streamspace_sdk.testing import (
    LeaseConformance,
    LeaseFactory,
    PlatformConformance,
    PlatformFactory,
    SpecFactory,
)


class TestLiveLeaseConformance(LeaseConformance):
    @pytest.fixture
    def lease_factory(self, namespace: str) -> LeaseFactory:
        config = KubernetesLease.Settings(
            kubeconfig=KUBECONFIG,
            lease_lock_namespace=namespace,
            lease_lock_name=f"live-{uuid.uuid4().hex[:8]}",
        )
        return lambda clock: KubernetesLease(config, clock=clock)


class TestLivePlatformConformance(PlatformConformance):
    start_timeout_s = 300.0

    @pytest.fixture
    def platform_factory(self, namespace: str) -> PlatformFactory:
        config = KubernetesPlatform.Settings(
            kubeconfig=KUBECONFIG,
            namespace=namespace,
            vnc_access="port-forward",
            max_sessions=3,
            home_storage_size="100Mi",
        )
        agent_id = f"live-{uuid.uuid4().hex[:8]}"
        return lambda: KubernetesPlatform(config, agent_id=agent_id)

    @pytest.fixture
    def session_spec_factory(self) -> SpecFactory:
        return lambda session_id, generation: SessionSpec(
            session_id=session_id,
            generation=generation,
            user="live",
            template="desktop",
            image=IMAGE,
        )

    @pytest.fixture
    def failing_spec(self) -> SessionSpec:
        return SessionSpec(
            session_id=f"conf-fail-{uuid.uuid4().hex[:8]}",
            generation=1,
            user="live",
            template="desktop",
            image=IMAGE,
            command=["/bin/false"],
        )
