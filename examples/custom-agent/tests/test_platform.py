"""The agent's inline ``pattern`` platform passes the SDK's ``PlatformConformance``.

Its sessions live in the agent process, so it has no ``adopt`` capability and the kit
skips the adoption tests; ``examples/tests/test_custom_agent.py`` runs the whole agent
against a control plane.
"""

from __future__ import annotations

import pytest
from agent import PatternPlatform

from streamspace_sdk import SessionSpec
from streamspace_sdk.testing import PlatformConformance, PlatformFactory


class TestPatternConformance(PlatformConformance):
    start_timeout_s = 5.0

    @pytest.fixture
    def platform_factory(self) -> PlatformFactory:
        config = PatternPlatform.Settings(max_sessions=2)
        return lambda: PatternPlatform(config, agent_id="pattern-conformance")

    @pytest.fixture
    def failing_spec(self) -> SessionSpec:
        return SessionSpec(
            session_id="conf-fail", generation=1, user="u", template="t", command=["xterm"]
        )
