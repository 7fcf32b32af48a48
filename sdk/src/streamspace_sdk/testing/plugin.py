"""The kit's pytest plugin: ``pytest_plugins = ["streamspace_sdk.testing.plugin"]``.

It provides shared fixtures; the suites themselves are classes you subclass.
"""

from __future__ import annotations

import pytest

from streamspace_sdk.testing.clock import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    """A :class:`FakeClock` starting at 2026-01-01T00:00:00Z."""
    return FakeClock()
