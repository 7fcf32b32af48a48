"""The kubernetes platform passes ``PlatformConformance`` against the fake API server, whose
kubelet runs the pods with Docker; VNC goes through the API server's port-forward."""

from __future__ import annotations

import shlex
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import DESKTOP_IMAGE, DOCKER_HOST, NAMESPACE
from fakeapi import FakeApiServer

from streamspace_k8s import KubernetesPlatform
from streamspace_sdk.platform import LABEL_SESSION_ID, Platform, SessionSpec
from streamspace_sdk.testing import PlatformConformance, PlatformFactory, SpecFactory


def platform_settings(kubeconfig: Path, **values: Any) -> KubernetesPlatform.Settings:
    base: dict[str, Any] = {
        "kubeconfig": str(kubeconfig),
        "namespace": NAMESPACE,
        "vnc_access": "port-forward",
        "image_pull_policy": "Never",
        "max_sessions": 3,
        "k8s_start_timeout": 60,
        "kube_api_timeout": 10,
    }
    return KubernetesPlatform.Settings(**(base | values))


def make_spec(session_id: str, generation: int = 1, **fields: Any) -> SessionSpec:
    values: dict[str, Any] = {
        "session_id": session_id,
        "generation": generation,
        "user": "conf",
        "template": "desktop",
        "image": DESKTOP_IMAGE,
    }
    return SessionSpec(**(values | fields))


class DockerExecHomeProbe:
    """Reads and writes the home of a session's pod by ``docker exec`` into the container
    the fake kubelet runs for it."""

    def __init__(self, apiserver: FakeApiServer) -> None:
        self.apiserver = apiserver
        self.engine = docker.APIClient(base_url=DOCKER_HOST, version="auto")

    def _container(self, session_id: str) -> str:
        pods = [
            p
            for p in self.apiserver.list_objects("", "pods", NAMESPACE)
            if (p["metadata"].get("labels") or {}).get(LABEL_SESSION_ID) == session_id
        ]
        assert len(pods) == 1, pods
        return f"{self.apiserver.prefix}-{NAMESPACE}-{pods[0]['metadata']['name']}"

    async def _exec(self, session_id: str, script: str) -> tuple[int, str]:
        exec_id = self.engine.exec_create(self._container(session_id), ["sh", "-c", script])["Id"]
        output = self.engine.exec_start(exec_id).decode()
        return int(self.engine.exec_inspect(exec_id)["ExitCode"]), output

    async def write(self, platform: Platform, session_id: str, name: str, content: str) -> None:
        code, output = await self._exec(
            session_id, f'printf %s {shlex.quote(content)} > "$HOME/{name}"'
        )
        assert code == 0, output

    async def read(self, platform: Platform, session_id: str, name: str) -> str | None:
        code, output = await self._exec(session_id, f'cat "$HOME/{name}"')
        return output if code == 0 else None


@pytest.mark.usefixtures("desktop_image")
class TestKubernetesConformance(PlatformConformance):
    start_timeout_s = 60.0

    @pytest.fixture
    def platform_factory(self, kubeconfig: Path) -> PlatformFactory:
        config = platform_settings(kubeconfig)
        agent_id = f"conf-{uuid.uuid4().hex[:8]}"
        return lambda: KubernetesPlatform(config, agent_id=agent_id)

    @pytest.fixture
    def session_spec_factory(self) -> SpecFactory:
        return lambda session_id, generation: make_spec(session_id, generation)

    @pytest.fixture
    def failing_spec(self) -> SessionSpec:
        return make_spec(f"conf-fail-{uuid.uuid4().hex[:8]}", 1, command=["/bin/false"])

    @pytest.fixture
    def home_probe(self, apiserver: FakeApiServer) -> DockerExecHomeProbe:
        return DockerExecHomeProbe(apiserver)
