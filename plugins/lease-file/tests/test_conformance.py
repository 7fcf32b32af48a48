"""The file lease passes the SDK's ``LeaseConformance`` on a real file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis
import pytest

from streamspace_lease_file import FileLease
from streamspace_sdk.clock import Clock
from streamspace_sdk.lease import Lease
from streamspace_sdk.testing import ElectionMachine, LeaseConformance, LeaseFactory


class TestFileLeaseConformance(LeaseConformance):
    @pytest.fixture
    def lease_factory(self, lease_path: Path) -> LeaseFactory:
        settings = FileLease.Settings(lease_file=lease_path)
        return lambda clock: FileLease(settings, clock=clock)


ROOT = Path(tempfile.mkdtemp(prefix="streamspace-lease-file-election-"))


class FileElection(ElectionMachine):
    """Three electors over one lease file, while hypothesis pauses, breaks and restarts them."""

    def make_lease(self, clock: Clock, key: str) -> Lease:
        return FileLease(FileLease.Settings(lease_file=ROOT / key / "lease"), clock=clock)


TestFileElection = FileElection.TestCase
TestFileElection.settings = hypothesis.settings(
    max_examples=20, stateful_step_count=20, deadline=None
)
