"""``examples/hook-policy`` in a real stack: the agent process loads ``template-policy``
and vetoes a session its user may not start; the control plane process loads
``audit-jsonl`` and writes what happened to the audit file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CUSTOM_AGENT, Stack, create_session, create_template, wait_state

pytestmark = pytest.mark.asyncio

POLICY = """\
groups:
  engineering: [alice]
templates:
  bars: [engineering]
"""


async def test_policy_vetoes_and_audit_lines_are_written(stack: Stack, tmp_path: Path) -> None:
    audit_file = tmp_path / "audit.jsonl"
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    admin = await stack.start_control_plane(
        STREAMSPACE_LOAD_PLUGINS="audit-jsonl", AUDIT_LOG_FILE=str(audit_file)
    )
    await stack.start_agent(
        "policy-agent",
        CUSTOM_AGENT,
        STREAMSPACE_LOAD_PLUGINS="template-policy",
        TEMPLATE_POLICY_FILE=str(policy_file),
    )
    await create_template(admin, "bars", platform="pattern")
    alice = await stack.add_user("alice")
    carol = await stack.add_user("carol")

    allowed = await create_session(alice, "bars")
    await wait_state(alice, allowed, "running")
    refused = await create_session(carol, "bars")
    failed = await wait_state(carol, refused, "failed", fail_on=())
    reason = (
        "user 'carol' may not start template 'bars': it is for group(s) engineering, "
        "and 'carol' is in none of them"
    )
    assert reason in failed["detail"]
    session = (await carol.get(f"/api/v1/sessions/{refused}")).json()
    assert (session["state"], session["desired_state"]) == ("failed", "running"), session
    assert reason in session["reason"]

    lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
    done = {(line["actor"], line["action"], line["resource"]) for line in lines}
    assert ("admin", "template.create", "template/bars") in done
    assert ("admin", "user.create", "user/carol") in done
    assert ("carol", "session.create", f"session/{refused}") in done
    assert ("alice", "session.create", f"session/{allowed}") in done
    assert all(line["at"].endswith("Z") for line in lines)
    (created,) = [line for line in lines if line["resource"] == f"session/{refused}"]
    assert created["detail"] == {"template": "bars", "user": "carol"}
