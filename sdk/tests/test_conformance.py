"""The SDK's built-in lease drivers and its shipped doubles pass the kit's suites."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from streamspace_sdk.clock import Clock
from streamspace_sdk.lease import Lease
from streamspace_sdk.leases import MemoryLease, MemoryLeaseStore
from streamspace_sdk.platform import Platform, SessionSpec
from streamspace_sdk.testing import (
    HomeProbe,
    LeaseConformance,
    LeaseFactory,
    MemoryHomeProbe,
    MemoryPlatform,
    MemoryPlatformState,
    PlatformConformance,
    PlatformFactory,
    StreamPairFactory,
    TransportConformance,
    memory_stream_pair,
)
from streamspace_sdk.transport import ByteStream


class TestMemoryLease(LeaseConformance):
    @pytest.fixture
    def lease_factory(self) -> LeaseFactory:
        store = MemoryLeaseStore()

        def make(clock: Clock) -> Lease:
            return MemoryLease(clock=clock, store=store)

        return make


class TestMemoryPlatform(PlatformConformance):
    @pytest_asyncio.fixture
    async def platform_factory(self) -> AsyncIterator[PlatformFactory]:  # type: ignore[override]
        state = MemoryPlatformState(screen=(64, 48))

        def make() -> Platform:
            return MemoryPlatform(agent_id="conformance", state=state)

        yield make
        await state.close()

    @pytest.fixture
    def home_probe(self) -> HomeProbe:
        return MemoryHomeProbe()

    @pytest.fixture
    def failing_spec(self, platform_factory: PlatformFactory) -> SessionSpec:
        platform = platform_factory()
        assert isinstance(platform, MemoryPlatform)
        platform.state.fail_next_start = "image not found: nope:latest"
        return SessionSpec(session_id="conf-fail", generation=1, user="u", template="t")


class TestMemoryStreams(TransportConformance):
    @pytest.fixture
    def transport_pair(self) -> StreamPairFactory:
        async def open_pair() -> tuple[ByteStream, ByteStream]:
            return memory_stream_pair()

        return open_pair
