"""The qemu platform passes the SDK's ``PlatformConformance`` with real VMs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from conftest import make_spec, settings

from streamspace_example_qemu import QemuPlatform
from streamspace_sdk import SessionSpec
from streamspace_sdk.testing import PlatformConformance, PlatformFactory


class TestQemuConformance(PlatformConformance):
    # A VM is up in well under a second; 20 s leaves room for a loaded CI host.
    start_timeout_s = 20.0

    @pytest.fixture
    def platform_factory(self, state_dir: Path, image_dir: Path) -> PlatformFactory:
        # Each call is a new object over the same state directory: a restarted agent.
        config = settings(state_dir, qemu_image_dir=image_dir)
        agent_id = f"conf-{uuid.uuid4().hex[:8]}"
        return lambda: QemuPlatform(config, agent_id=agent_id)

    @pytest.fixture
    def failing_spec(self) -> SessionSpec:
        # QEMU itself refuses it ("Image is not in qcow2 format"), so the test covers the
        # path where QEMU's own message becomes the PlatformError.
        options = {"disk": "garbage.qcow2", "disk_format": "qcow2"}
        return make_spec(f"conf-fail-{uuid.uuid4().hex[:8]}", 1, platform_options=options)
