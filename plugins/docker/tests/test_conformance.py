"""The docker platform passes the SDK's ``PlatformConformance`` against the real engine."""

from __future__ import annotations

import shlex
import uuid

import docker
import pytest
from conftest import make_spec, settings

from streamspace_docker import DockerPlatform
from streamspace_sdk.platform import Platform, SessionSpec
from streamspace_sdk.testing import PlatformConformance, PlatformFactory, SpecFactory


class ExecHomeProbe:
    """Reads and writes files in a session's home with ``docker exec``, as its user."""

    def __init__(self, engine: docker.APIClient) -> None:
        self.engine = engine

    async def _exec(self, platform: Platform, session_id: str, script: str) -> tuple[int, str]:
        assert isinstance(platform, DockerPlatform)
        name = platform.container_name(session_id)
        exec_id = self.engine.exec_create(name, ["sh", "-c", script])["Id"]
        output = self.engine.exec_start(exec_id).decode()
        return int(self.engine.exec_inspect(exec_id)["ExitCode"]), output

    async def write(self, platform: Platform, session_id: str, name: str, content: str) -> None:
        script = f'printf %s {shlex.quote(content)} > "$HOME/{name}"'
        code, output = await self._exec(platform, session_id, script)
        assert code == 0, output

    async def read(self, platform: Platform, session_id: str, name: str) -> str | None:
        code, output = await self._exec(platform, session_id, f'cat "$HOME/{name}"')
        return output if code == 0 else None


@pytest.mark.usefixtures("desktop_image")
class TestDockerConformance(PlatformConformance):
    start_timeout_s = 60.0

    @pytest.fixture
    def platform_factory(self) -> PlatformFactory:
        config = settings(max_sessions=3)
        agent_id = f"conf-{uuid.uuid4().hex[:8]}"
        return lambda: DockerPlatform(config, agent_id=agent_id)

    @pytest.fixture
    def session_spec_factory(self) -> SpecFactory:
        return lambda session_id, generation: make_spec(session_id, generation, user="conf")

    @pytest.fixture
    def failing_spec(self) -> SessionSpec:
        return make_spec(f"conf-fail-{uuid.uuid4().hex[:8]}", 1, command=["/bin/false"])

    @pytest.fixture
    def home_probe(self, engine: docker.APIClient) -> ExecHomeProbe:
        return ExecHomeProbe(engine)
