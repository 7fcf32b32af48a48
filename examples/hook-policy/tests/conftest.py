"""Fixtures: the plugins loaded through the SDK's real plugin manager, from their entry
points, and a policy file."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamspace_sdk import Hooks, make_plugin_manager
from streamspace_sdk.settings import PluginSettings

pytest_plugins = ["streamspace_sdk.testing.plugin"]

POLICY = """\
groups:
  engineering: [alice, bob]
  contractors: [carol]
templates:
  desktop: ["*"]
  gpu-workstation: [engineering]
"""


def hooks(names: str = "template-policy,audit-jsonl") -> Hooks:
    """The plugins named, loaded from the ``streamspace`` entry-point group, as an agent or a
    control plane loads them (``STREAMSPACE_LOAD_PLUGINS``)."""
    return Hooks(make_plugin_manager(settings=PluginSettings(streamspace_load_plugins=names)))


@pytest.fixture
def policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``TEMPLATE_POLICY_FILE``, holding :data:`POLICY`."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    monkeypatch.setenv("TEMPLATE_POLICY_FILE", str(path))
    return path


@pytest.fixture
def audit_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``AUDIT_LOG_FILE``, not created yet."""
    path = tmp_path / "audit" / "audit.jsonl"
    path.parent.mkdir()
    monkeypatch.setenv("AUDIT_LOG_FILE", str(path))
    return path
