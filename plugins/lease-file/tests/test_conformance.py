"""The file lease passes the SDK's ``LeaseConformance`` on a real file."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamspace_lease_file import FileLease
from streamspace_sdk.testing import LeaseConformance, LeaseFactory


class TestFileLeaseConformance(LeaseConformance):
    @pytest.fixture
    def lease_factory(self, lease_path: Path) -> LeaseFactory:
        settings = FileLease.Settings(lease_file=lease_path)
        return lambda clock: FileLease(settings, clock=clock)
