"""``agent.py`` is a script, not a package: its folder goes on ``sys.path`` for the tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest_plugins = ["streamspace_sdk.testing.plugin"]
