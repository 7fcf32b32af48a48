"""Agents and agent tokens, as admins manage them."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import apikit
import pytest
from apikit import assert_error

from streamspace_controlplane import auth
from streamspace_controlplane.http import ApiError
from streamspace_controlplane.models import AgentRecord, CommandRecord
from streamspace_controlplane.store.base import Store
from streamspace_sdk.platform import Capacity, Usage


async def _agent(store: Store, agent_id: str, *, online: bool = True) -> None:
    await store.register_agent(
        AgentRecord(
            agent_id=agent_id,
            platform="kubernetes",
            region="us-east-1",
            labels={"gpu": "no"},
            capacity=Capacity(max_sessions=100, max_cpu_m=4000),
            usage=Usage(sessions=3, cpu_m=1500, memory_mib=2048),
            metadata={"version": "0.4.0"},
            websocket_conn_id="conn-1",
            last_heartbeat=datetime(2030, 1, 1, tzinfo=UTC),
            fencing_epoch=4,
        )
    )
    if not online:
        await store.set_agent_offline(agent_id)


@pytest.mark.asyncio
async def test_list_and_get_agents_in_the_seed_shape(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await _agent(api.cp.store, "k8s-prod")
        await _agent(api.cp.store, "docker-1", online=False)
        listed = await api.client.get("/api/v1/agents", headers=api.admin)
        assert listed.status_code == 200
        agents = listed.json()
        assert [a["agent_id"] for a in agents] == ["docker-1", "k8s-prod"]
        k8s = agents[1]
        assert k8s["status"] == "online"
        assert (k8s["platform"], k8s["region"]) == ("kubernetes", "us-east-1")
        assert k8s["capacity"] == {
            "max_sessions": 100,
            "current_sessions": 3,
            "max_cpu_m": 4000,
            "max_memory_mib": None,
            "cpu_m": 1500,
            "memory_mib": 2048,
        }
        assert datetime.fromisoformat(k8s["last_heartbeat"]) == datetime(2030, 1, 1, tzinfo=UTC)
        assert k8s["labels"] == {"gpu": "no"}
        assert k8s["metadata"] == {"version": "0.4.0"}
        assert k8s["fencing_epoch"] == 4
        assert "websocket_conn_id" not in k8s
        assert agents[0]["status"] == "offline"

        one = await api.client.get("/api/v1/agents/k8s-prod", headers=api.admin)
        assert one.json() == k8s
        assert_error(await api.client.get("/api/v1/agents/nope", headers=api.admin), 404)


async def _place(store: Store, session_id: str, agent_id: str, state: str) -> None:
    """Put a session on an agent in ``state``, as the scheduler and the agent would."""
    await store.update_session(session_id, agent_id=agent_id, platform="kubernetes", state=state)


@pytest.mark.asyncio
async def test_deleting_an_agent_online_or_not(store: Store, tmp_path: Path) -> None:
    """Online or offline, the agent goes, with its tokens; an unknown one is 404."""
    async with apikit.running(store, tmp_path) as api:
        await _agent(api.cp.store, "online-1")
        await _agent(api.cp.store, "offline-1", online=False)
        for agent_id in ("online-1", "offline-1"):
            await api.client.post(f"/api/v1/agents/{agent_id}/tokens", headers=api.admin)
        token = (await api.client.post("/api/v1/agents/online-1/tokens", headers=api.admin)).json()
        for agent_id in ("online-1", "offline-1"):
            gone = await api.client.delete(f"/api/v1/agents/{agent_id}", headers=api.admin)
            assert gone.status_code == 204, gone.text
            assert await api.cp.store.get_agent(agent_id) is None
        tokens = await api.cp.store.list_agent_tokens()
        assert len(tokens) == 3
        assert all(t.revoked_at is not None for t in tokens)
        with pytest.raises(ApiError):  # it cannot come straight back
            await auth.authenticate_agent(api.cp, token["token"])
        assert_error(await api.client.delete("/api/v1/agents/offline-1", headers=api.admin), 404)
        deletes = [a for a in await api.cp.store.list_audit(100) if a.action == "agent.delete"]
        assert sorted((a.resource, a.detail["was"]) for a in deletes) == [
            ("agent/offline-1", "offline"),
            ("agent/online-1", "online"),
        ]
        online = next(a for a in deletes if a.resource == "agent/online-1")
        revoked = online.detail["tokens_revoked"]
        assert isinstance(revoked, list)
        assert sorted(map(str, revoked)) == sorted(
            t.token_id for t in tokens if t.agent_id == "online-1"
        )


@pytest.mark.asyncio
async def test_the_sessions_of_a_deleted_agent_stop_and_can_run_elsewhere(
    store: Store, tmp_path: Path
) -> None:
    """Each session on the agent is stopped and unplaced, with the reason; one being
    deleted is forgotten; its open commands fail; a session asked to run again waits to be
    placed anew."""
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        await _agent(api.cp.store, "k8s-1")
        await _agent(api.cp.store, "k8s-2")
        running = await api.session(bob)
        hibernated = await api.session(bob)
        deleting = await api.session(bob)
        elsewhere = await api.session(bob)
        await _place(api.cp.store, running["id"], "k8s-1", "running")
        await _place(api.cp.store, hibernated["id"], "k8s-1", "hibernated")
        await _place(api.cp.store, deleting["id"], "k8s-1", "running")
        await _place(api.cp.store, elsewhere["id"], "k8s-2", "running")
        stopping = await api.client.delete(f"/api/v1/sessions/{deleting['id']}", headers=bob)
        assert stopping.status_code == 202, stopping.text
        placed = await api.cp.store.get_session(running["id"])
        assert placed is not None
        command = await api.cp.store.enqueue_command(
            CommandRecord(
                command_id="c-1",
                agent_id="k8s-1",
                session_id=placed.id,
                generation=placed.generation,
                command_type="start",
                command_data={},
            )
        )

        gone = await api.client.delete("/api/v1/agents/k8s-1", headers=api.admin)
        assert gone.status_code == 204, gone.text

        for session in (running, hibernated):
            after = (await api.client.get(f"/api/v1/sessions/{session['id']}", headers=bob)).json()
            assert (after["state"], after["desired_state"]) == ("stopped", "stopped")
            assert (after["agent_id"], after["platform"]) == (None, None)
            assert "agent k8s-1 was deleted" in after["reason"]
        forgotten = await api.client.get(f"/api/v1/sessions/{deleting['id']}", headers=bob)
        assert_error(forgotten, 404)
        kept = (await api.client.get(f"/api/v1/sessions/{elsewhere['id']}", headers=bob)).json()
        assert (kept["state"], kept["agent_id"]) == ("running", "k8s-2")
        failed = await api.cp.store.get_command(command.command_id)
        assert failed is not None
        assert failed.status == "failed"
        delete = next(a for a in await api.cp.store.list_audit(100) if a.action == "agent.delete")
        assert delete.detail["sessions_released"] == 3

        again = await api.client.patch(
            f"/api/v1/sessions/{running['id']}", json={"state": "running"}, headers=bob
        )
        assert again.status_code == 200, again.text
        assert (again.json()["state"], again.json()["agent_id"]) == ("pending", None)
        removed = await api.client.delete(f"/api/v1/sessions/{hibernated['id']}", headers=bob)
        assert removed.status_code == 204, removed.text


@pytest.mark.asyncio
async def test_agent_tokens_create_list_revoke(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        created = await api.client.post("/api/v1/agents/k8s-prod/tokens", headers=api.admin)
        assert created.status_code == 201, created.text
        assert created.headers["Cache-Control"] == "no-store"
        body = created.json()
        assert set(body) == {
            "token_id",
            "agent_id",
            "token",
            "created_at",
            "revoked_at",
            "last_used_at",
        }
        token = body["token"]
        assert re.fullmatch(rf"ssa_{body['token_id']}_[A-Za-z0-9_-]{{43}}", token)
        assert (await auth.authenticate_agent(api.cp, token)).agent_id == "k8s-prod"

        other = (await api.client.post("/api/v1/agents/docker-1/tokens", headers=api.admin)).json()
        listed = await api.client.get("/api/v1/agent-tokens", headers=api.admin)
        assert listed.status_code == 200
        assert {t["token_id"] for t in listed.json()} == {body["token_id"], other["token_id"]}
        assert token not in listed.text
        assert "hash" not in listed.text
        assert all("token" not in t for t in listed.json())
        mine = await api.client.get("/api/v1/agent-tokens?agent_id=k8s-prod", headers=api.admin)
        assert [t["token_id"] for t in mine.json()] == [body["token_id"]]
        assert mine.json()[0]["last_used_at"] is not None

        revoked = await api.client.delete(
            f"/api/v1/agent-tokens/{body['token_id']}", headers=api.admin
        )
        assert revoked.status_code == 204
        with pytest.raises(ApiError):
            await auth.authenticate_agent(api.cp, token)
        after = await api.client.get("/api/v1/agent-tokens?agent_id=k8s-prod", headers=api.admin)
        assert after.json()[0]["revoked_at"] is not None
        twice = await api.client.delete(
            f"/api/v1/agent-tokens/{body['token_id']}", headers=api.admin
        )
        assert_error(twice, 404, "not_found")
        unknown = await api.client.delete("/api/v1/agent-tokens/nope", headers=api.admin)
        assert_error(unknown, 404, "not_found")
        audit = [a.action for a in await api.cp.store.list_audit(100)]
        assert audit.count("agent_token.create") == 2
        assert audit.count("agent_token.revoke") == 1


@pytest.mark.asyncio
async def test_agent_token_validation(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        bad_id = await api.client.post("/api/v1/agents/bad%20id/tokens", headers=api.admin)
        assert "bad agent id" in assert_error(bad_id, 422, "validation_error")["message"]
        bad_query = await api.client.get("/api/v1/agent-tokens?agent_id=-x", headers=api.admin)
        assert_error(bad_query, 422, "validation_error")
