"""The template policy, loaded through the real plugin manager: who it lets in, who it
vetoes and why, and what it does with a missing or broken policy file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import hooks
from pydantic import SecretStr

from streamspace_sdk import AgentSettings, SessionSpec, SessionVetoed
from streamspace_sdk.agent import Agent, Backoff
from streamspace_sdk.drivers import list_plugins
from streamspace_sdk.protocol import CommandResult
from streamspace_sdk.testing import FakeControlPlane, MemoryPlatform, MemoryPlatformState


def spec(user: str, template: str) -> SessionSpec:
    return SessionSpec(session_id=f"s-{user}", generation=1, user=user, template=template)


def prepare(asked: SessionSpec) -> SessionSpec:
    """Pass ``asked`` through the plugin as the agent does before a start."""
    return asyncio.run(hooks().prepare_session_spec(asked, "agent-1"))


def test_both_plugins_are_installed_as_entry_points() -> None:
    found = {(p.group, p.name): p for p in list_plugins(["streamspace"])}
    assert found[("streamspace", "template-policy")].error is None
    assert found[("streamspace", "audit-jsonl")].error is None
    assert found[("streamspace", "template-policy")].distribution == "streamspace-example-policy"


@pytest.mark.usefixtures("policy_file")
@pytest.mark.parametrize(
    ("user", "template"),
    [("alice", "gpu-workstation"), ("bob", "gpu-workstation"), ("carol", "desktop")],
)
def test_members_of_an_allowed_group_start_unchanged(user: str, template: str) -> None:
    asked = spec(user, template)
    assert prepare(asked) == asked


@pytest.mark.usefixtures("policy_file")
def test_user_outside_the_group_is_vetoed_with_the_reason() -> None:
    with pytest.raises(SessionVetoed) as vetoed:
        prepare(spec("carol", "gpu-workstation"))
    assert str(vetoed.value) == (
        "user 'carol' may not start template 'gpu-workstation': it is for group(s) "
        "engineering, and 'carol' is in none of them"
    )


def test_unlisted_templates_follow_the_default(policy_file: Path) -> None:
    with pytest.raises(SessionVetoed, match="'firefox' is not in the template policy"):
        prepare(spec("alice", "firefox"))
    policy_file.write_text(policy_file.read_text() + "default: allow\n")  # applies at once
    asked = spec("alice", "firefox")
    assert prepare(asked) == asked


def test_without_a_policy_file_every_session_is_vetoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEMPLATE_POLICY_FILE", raising=False)
    with pytest.raises(SessionVetoed, match="TEMPLATE_POLICY_FILE is not set"):
        prepare(spec("alice", "desktop"))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("groups: [alice\n", r"cannot read .*policy.yaml"),
        ("templates:\n  desktop: everyone\n", r"templates.desktop: Input should be a valid list"),
        ("template:\n  desktop: ['*']\n", r"template: Extra inputs are not permitted"),
        ("default: maybe\n", r"default: Input should be 'allow' or 'deny'"),
    ],
)
def test_a_broken_policy_vetoes_every_session_saying_why(
    policy_file: Path, content: str, problem: str
) -> None:
    policy_file.write_text(content)
    with pytest.raises(SessionVetoed, match=rf"the template policy is broken \(.*{problem}"):
        prepare(spec("alice", "desktop"))


def test_a_missing_policy_file_vetoes(policy_file: Path) -> None:
    policy_file.unlink()
    with pytest.raises(SessionVetoed, match="No such file"):
        prepare(spec("alice", "desktop"))


@pytest.mark.usefixtures("policy_file")
@pytest.mark.asyncio
async def test_the_agent_runtime_answers_a_vetoed_start_with_the_reason() -> None:
    """A real agent, loading the plugin from its entry point, gets start commands from the
    SDK's fake control plane: the vetoed one fails with the policy's reason and the
    platform never sees it; the allowed one runs."""
    state = MemoryPlatformState()
    async with FakeControlPlane(token="t0ken") as fake:
        settings = AgentSettings(
            agent_id="policy-agent",
            control_plane_url=fake.url,
            agent_token=SecretStr("t0ken"),
            health_port=0,
        )
        platform = MemoryPlatform(agent_id="policy-agent", state=state)
        agent = Agent(settings, platform, hooks=hooks("template-policy"), backoff=Backoff(0.01))
        serving = asyncio.create_task(agent.serve())
        try:
            await fake.wait_registered()
            await fake.command("start", "s-carol", user="carol", template="gpu-workstation")
            refused = await fake.next_frame(CommandResult)
            await fake.command("start", "s-bob", user="bob", template="gpu-workstation")
            allowed = await fake.next_frame(CommandResult)
        finally:
            await agent.stop()
            await serving
    assert (refused.session_id, refused.ok) == ("s-carol", False)
    assert refused.reason is not None
    assert "'carol' may not start template 'gpu-workstation'" in refused.reason
    assert (allowed.session_id, allowed.ok) == ("s-bob", True)
    assert set(state.sessions) == {"s-bob"}
    assert state.starts == 1
