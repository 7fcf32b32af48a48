"""The SDK's lease conformance suite, against the shared Redis, in real time (2 s leases)."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import redis
from conftest import SHARED_URL, settings

from streamspace_lease_redis import RedisLease
from streamspace_sdk.clock import Clock
from streamspace_sdk.lease import Lease
from streamspace_sdk.testing import ElectionMachine, LeaseConformance, LeaseFactory


class TestRedisLeaseConformance(LeaseConformance):
    @pytest.fixture
    def lease_factory(self, lease_key: str) -> LeaseFactory:
        def make(clock: Clock) -> RedisLease:
            return RedisLease(settings(SHARED_URL, lease_key), clock=clock)

        return make


class RedisElection(ElectionMachine):
    """Three electors over one Redis lease in real time (Redis keeps the time)."""

    fake_time = False

    def make_lease(self, clock: Clock, key: str) -> Lease:
        KEYS.append(f"election-{key}")
        return RedisLease(settings(SHARED_URL, f"election-{key}"), clock=clock)


KEYS: list[str] = []

TestRedisElection = RedisElection.TestCase
TestRedisElection.settings = hypothesis.settings(
    max_examples=4, stateful_step_count=12, deadline=None
)


@pytest.fixture(scope="module", autouse=True)
def _election_keys() -> Iterator[None]:
    yield
    client = redis.Redis.from_url(SHARED_URL)
    for key in set(KEYS):
        client.delete(f"lease:{key}", f"lease:{key}:epoch")
    client.close()
