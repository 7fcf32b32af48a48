"""The SDK's lease conformance suite, against the shared Redis, in real time (2 s leases)."""

from __future__ import annotations

import pytest
from conftest import SHARED_URL, settings

from streamspace_lease_redis import RedisLease
from streamspace_sdk.clock import Clock
from streamspace_sdk.testing import LeaseConformance, LeaseFactory


class TestRedisLeaseConformance(LeaseConformance):
    @pytest.fixture
    def lease_factory(self, lease_key: str) -> LeaseFactory:
        def make(clock: Clock) -> RedisLease:
            return RedisLease(settings(SHARED_URL, lease_key), clock=clock)

        return make
