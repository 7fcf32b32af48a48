"""Sessions: create, list, read, change the desired state, delete; ownership and quota."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import apikit
import pytest
from apikit import assert_error

from streamspace_controlplane.models import AgentRecord
from streamspace_controlplane.services import sessions
from streamspace_controlplane.store.base import Store
from streamspace_sdk.platform import Capacity

SESSION_FIELDS = {
    "id",
    "user",
    "template",
    "desired_state",
    "state",
    "reason",
    "generation",
    "agent_id",
    "platform",
    "region",
    "labels",
    "deleting",
    "created_at",
    "updated_at",
}


async def _place(api: apikit.Api, session_id: str, state: str = "running") -> None:
    """Put a session on an agent in ``state``, as the scheduler and an agent would."""
    store = api.cp.store
    if await store.get_agent("agent-1") is None:
        await store.register_agent(
            AgentRecord(
                agent_id="agent-1",
                platform="process",
                capacity=Capacity(max_sessions=0),  # full: the scheduler leaves it alone
                websocket_conn_id="c1",
            )
        )
    await store.update_session(session_id, agent_id="agent-1", platform="process", state=state)


@pytest.mark.asyncio
async def test_create_session(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template("firefox", region="eu")
        bob = await api.user("bob")
        response = await api.client.post(
            "/api/v1/sessions",
            json={"template": "firefox", "state": "running", "labels": {"gpu": "yes"}},
            headers=bob,
        )
        assert response.status_code == 201, response.text
        session = response.json()
        assert set(session) == SESSION_FIELDS
        assert re.fullmatch(r"s-[0-9a-f]{16}", session["id"])
        assert response.headers["Location"] == f"/api/v1/sessions/{session['id']}"
        assert session["user"] == "bob"
        assert session["template"] == "firefox"
        assert (session["desired_state"], session["state"]) == ("running", "pending")
        assert session["generation"] == 1
        assert session["labels"] == {"gpu": "yes"}
        assert session["deleting"] is False

        stored = await api.cp.store.get_session(session["id"])
        assert stored is not None
        assert stored.template_snapshot.region == "eu"  # the template as it was
        events = await api.cp.store.list_session_events(session["id"])
        assert events[0].state == "pending"
        assert events[0].detail == "created by bob"
        audit = await api.cp.store.list_audit(100)
        assert any(
            a.action == "session.create" and a.resource == f"session/{session['id']}" for a in audit
        )


@pytest.mark.asyncio
async def test_admins_may_create_for_others_users_may_not(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        await api.user("carol")
        for_carol = await api.session(api.admin, user="carol")
        assert for_carol["user"] == "carol"
        own = await api.session(bob, user="bob")
        assert own["user"] == "bob"
        refused = await api.client.post(
            "/api/v1/sessions", json={"template": "firefox", "user": "carol"}, headers=bob
        )
        assert_error(refused, 403, "forbidden")
        ghost = await api.client.post(
            "/api/v1/sessions", json={"template": "firefox", "user": "ghost"}, headers=api.admin
        )
        assert "no user 'ghost'" in assert_error(ghost, 422, "validation_error")["message"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body.template"),
        ({"template": "Fire Fox"}, "body.template"),
        ({"template": "firefox", "state": "hibernated"}, "body.state"),
        ({"template": "firefox", "state": "exploded"}, "body.state"),
        ({"template": "firefox", "user": "bad user"}, "body.user"),
        ({"template": "firefox", "labels": "gpu"}, "body.labels"),
        ({"template": "firefox", "region": ""}, "body.region"),
        ({"template": "firefox", "size": "xl"}, "body.size"),
    ],
)
async def test_create_validation_errors(
    store: Store, tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        response = await api.client.post("/api/v1/sessions", json=body, headers=api.admin)
        error = assert_error(response, 422, "validation_error")
        assert field in [f["field"] for f in error["fields"]]


@pytest.mark.asyncio
async def test_an_unknown_template_is_refused(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.post(
            "/api/v1/sessions", json={"template": "nope"}, headers=api.admin
        )
        assert "no template 'nope'" in assert_error(response, 422)["message"]


@pytest.mark.asyncio
async def test_session_quota(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path, max_sessions_per_user=2) as api:
        await api.template()
        bob = await api.user("bob")
        first = await api.session(bob)
        await api.session(bob)
        refused = await api.client.post(
            "/api/v1/sessions", json={"template": "firefox"}, headers=bob
        )
        message = assert_error(refused, 429, "quota_exceeded")["message"]
        assert "you hold 2 session(s)" in message
        assert "the limit is 2 (MAX_SESSIONS_PER_USER)" in message
        # Other users have their own quota; an admin starting one for bob hits bob's.
        assert (await api.session(api.admin))["user"] == "admin"
        for_bob = await api.client.post(
            "/api/v1/sessions", json={"template": "firefox", "user": "bob"}, headers=api.admin
        )
        assert "user 'bob' holds 2" in assert_error(for_bob, 429)["message"]
        # Stopped sessions do not count...
        first_url = f"/api/v1/sessions/{first['id']}"
        await api.client.patch(first_url, json={"state": "stopped"}, headers=bob)
        assert (await api.session(bob))["state"] == "pending"
        # ...until they are started again.
        again = await api.client.patch(first_url, json={"state": "running"}, headers=bob)
        assert_error(again, 429, "quota_exceeded")
        assert (await api.client.get(first_url, headers=bob)).json()["state"] == "stopped"


@pytest.mark.asyncio
async def test_list_sessions_own_all_filters_and_pages(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path, max_sessions_per_user=10) as api:
        await api.template()
        bob = await api.user("bob")
        carol = await api.user("carol")
        bobs = [await api.session(bob) for _ in range(3)]
        carols = [await api.session(carol)]
        await _place(api, bobs[0]["id"], "running")

        mine = (await api.client.get("/api/v1/sessions", headers=bob)).json()
        assert mine["total"] == 3
        assert (mine["limit"], mine["offset"]) == (100, 0)
        assert [s["id"] for s in mine["items"]] == [s["id"] for s in reversed(bobs)]  # newest first
        assert {s["user"] for s in mine["items"]} == {"bob"}

        every = (await api.client.get("/api/v1/sessions", headers=api.admin)).json()
        assert every["total"] == 4
        only_carol = await api.client.get("/api/v1/sessions?user=carol", headers=api.admin)
        assert [s["id"] for s in only_carol.json()["items"]] == [carols[0]["id"]]
        running = await api.client.get("/api/v1/sessions?state=running", headers=api.admin)
        assert [s["id"] for s in running.json()["items"]] == [bobs[0]["id"]]
        pending = await api.client.get("/api/v1/sessions?state=pending", headers=bob)
        assert pending.json()["total"] == 2

        page = await api.client.get("/api/v1/sessions?limit=2&offset=1", headers=bob)
        body = page.json()
        assert (body["total"], body["limit"], body["offset"]) == (3, 2, 1)
        assert [s["id"] for s in body["items"]] == [bobs[1]["id"], bobs[0]["id"]]
        past = await api.client.get("/api/v1/sessions?offset=50", headers=bob)
        assert past.json()["items"] == []
        assert past.json()["total"] == 3

        own_filter = await api.client.get("/api/v1/sessions?user=bob", headers=bob)
        assert own_filter.json()["total"] == 3
        others = await api.client.get("/api/v1/sessions?user=carol", headers=bob)
        assert_error(others, 403, "forbidden")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=-1", "query.limit"),
        ("limit=0", "query.limit"),
        ("limit=501", "query.limit"),
        ("limit=ten", "query.limit"),
        ("offset=-5", "query.offset"),
        ("state=exploded", "query.state"),
        ("user=bad%20name", "query.user"),
        ("colour=red", "query.colour"),
        ("limit=1&limit=2", "query.limit"),
    ],
)
async def test_list_query_errors(store: Store, tmp_path: Path, query: str, field: str) -> None:
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.get(f"/api/v1/sessions?{query}", headers=api.admin)
        error = assert_error(response, 422, "validation_error")
        assert field in [f["field"] for f in error["fields"]]


@pytest.mark.asyncio
async def test_another_users_session_is_not_found(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        carol = await api.user("carol")
        session = await api.session(bob)
        url = f"/api/v1/sessions/{session['id']}"
        missing = "/api/v1/sessions/s-0000000000000000"
        answers = []
        for target in (url, missing):
            answers.append(assert_error(await api.client.get(target, headers=carol), 404))
            for method, body in (("PATCH", {"state": "stopped"}), ("DELETE", None)):
                response = await api.client.request(method, target, json=body, headers=carol)
                assert_error(response, 404, "not_found")
            events = await api.client.get(f"{target}/events", headers=carol)
            assert_error(events, 404, "not_found")
        # The answer for someone else's session reads like the one for a missing session.
        assert answers[0]["message"].replace(session["id"], "X") == answers[1]["message"].replace(
            "s-0000000000000000", "X"
        )
        # The owner and admins see it.
        assert (await api.client.get(url, headers=bob)).json()["id"] == session["id"]
        assert (await api.client.get(url, headers=api.admin)).json()["id"] == session["id"]
        # And it is untouched.
        assert (await api.client.get(url, headers=bob)).json()["desired_state"] == "running"


@pytest.mark.asyncio
async def test_patch_changes_the_desired_state(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        session = await api.session(bob)
        sid = session["id"]
        await _place(api, sid, "running")
        url = f"/api/v1/sessions/{sid}"

        hibernate = await api.client.patch(url, json={"state": "hibernated"}, headers=bob)
        assert hibernate.status_code == 200, hibernate.text
        body = hibernate.json()
        assert (body["desired_state"], body["state"], body["generation"]) == (
            "hibernated",
            "running",
            2,
        )
        # Asking again changes nothing.
        again = await api.client.patch(url, json={"state": "hibernated"}, headers=bob)
        assert again.json()["generation"] == 2
        await api.cp.store.update_session(sid, state="hibernated")
        wake = await api.client.patch(url, json={"state": "running"}, headers=bob)
        assert (wake.json()["desired_state"], wake.json()["generation"]) == ("running", 3)

        details = [e.detail for e in await api.cp.store.list_session_events(sid)]
        assert "bob asked for hibernated" in details
        assert "bob asked for running" in details
        audit = [a for a in await api.cp.store.list_audit(100) if a.action == "session.update"]
        assert len(audit) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("state", "target", "allowed"),
    [
        ("stopped", "hibernated", False),
        ("failed", "hibernated", False),
        ("stopping", "hibernated", False),
        ("pending", "hibernated", False),
        ("running", "hibernated", True),
        ("starting", "hibernated", True),
        ("lost", "hibernated", True),
        ("failed", "running", True),
        ("stopped", "running", True),
        ("running", "stopped", True),
        ("failed", "stopped", True),
    ],
)
async def test_transitions(
    store: Store, tmp_path: Path, state: str, target: str, allowed: bool
) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        session = await api.session(api.admin)
        if state == "pending":
            pass
        else:
            await _place(api, session["id"], state)
        if target == "running":  # make it a change
            await api.cp.store.update_session(session["id"], desired_state="stopped")
        response = await api.client.patch(
            f"/api/v1/sessions/{session['id']}", json={"state": target}, headers=api.admin
        )
        if allowed:
            assert response.status_code == 200, response.text
            assert response.json()["desired_state"] == target
        else:
            message = assert_error(response, 409, "conflict")["message"]
            assert message.startswith(f"cannot make the session {target}: ")


@pytest.mark.asyncio
async def test_stopping_an_unplaced_session_stops_it_at_once(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        session = await api.session(api.admin)
        url = f"/api/v1/sessions/{session['id']}"
        stopped = await api.client.patch(url, json={"state": "stopped"}, headers=api.admin)
        assert (stopped.json()["state"], stopped.json()["desired_state"]) == ("stopped", "stopped")
        # Running again sends it back to the scheduler.
        again = await api.client.patch(url, json={"state": "running"}, headers=api.admin)
        body = again.json()
        assert (body["state"], body["desired_state"], body["generation"]) == (
            "pending",
            "running",
            3,
        )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"state": "exploded"}, 422),
        ({"state": "pending"}, 422),
        ({}, 422),
        ({"state": "running", "extra": 1}, 422),
        ([], 422),
        ("not json", 400),
    ],
)
async def test_patch_validation_errors(store: Store, tmp_path: Path, body: Any, status: int):
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        session = await api.session(api.admin)
        url = f"/api/v1/sessions/{session['id']}"
        if isinstance(body, str):
            response = await api.client.patch(url, content=body, headers=api.admin)
        else:
            response = await api.client.patch(url, json=body, headers=api.admin)
        assert_error(response, status)


@pytest.mark.asyncio
async def test_delete_unplaced_or_finished_sessions_at_once(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        unplaced = await api.session(bob)
        finished = await api.session(bob)
        await _place(api, finished["id"], "failed")
        for session in (unplaced, finished):
            url = f"/api/v1/sessions/{session['id']}"
            response = await api.client.delete(url, headers=bob)
            assert response.status_code == 204
            assert response.content == b""
            assert await api.cp.store.get_session(session["id"]) is None
            assert_error(await api.client.get(url, headers=bob), 404)


@pytest.mark.asyncio
async def test_delete_a_running_session_stops_then_forgets(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        session = await api.session(bob)
        await _place(api, session["id"], "running")
        url = f"/api/v1/sessions/{session['id']}"
        response = await api.client.delete(url, headers=bob)
        assert response.status_code == 202, response.text
        body = response.json()
        assert (body["desired_state"], body["deleting"], body["generation"]) == (
            "stopped",
            True,
            2,
        )
        stored = await api.cp.store.get_session(session["id"])
        assert stored is not None
        assert stored.forget
        # Deleting again is harmless; asking it to run again is refused.
        again = await api.client.delete(url, headers=bob)
        assert again.status_code == 202
        assert again.json()["generation"] == 2
        run = await api.client.patch(url, json={"state": "running"}, headers=bob)
        assert "being deleted" in assert_error(run, 409)["message"]


@pytest.mark.asyncio
async def test_a_burst_past_max_concurrent_starts_gets_429_with_retry_after(
    store: Store, tmp_path: Path
) -> None:
    async with apikit.running(
        store, tmp_path, max_sessions_per_user=100, max_concurrent_starts=5
    ) as api:
        await api.template()
        bob = await api.user("bob")

        async def create() -> Any:
            return await api.client.post(
                "/api/v1/sessions", json={"template": "firefox"}, headers=bob
            )

        burst = await asyncio.gather(*(create() for _ in range(20)))
        statuses = [r.status_code for r in burst]
        # Concurrent requests count each other: never more than 5, and no errors. (A row
        # committed just before its request leaves the count may be counted twice, so a
        # burst may get fewer, never more.)
        assert set(statuses) == {201, 429}
        assert 1 <= statuses.count(201) <= 5
        refused = next(r for r in burst if r.status_code == 429)
        message = assert_error(refused, 429, "too_many_starts")["message"]
        assert "at most 5 may start at once (MAX_CONCURRENT_STARTS)" in message
        assert refused.headers["Retry-After"] == "2"
        # One at a time the count is exact: the slots fill up to 5, and a session that
        # runs frees its slot.
        while (await create()).status_code == 201:
            pass
        starting = (await api.client.get("/api/v1/sessions", headers=bob)).json()["items"]
        assert len(starting) == 5
        await _place(api, starting[0]["id"], "running")
        assert (await create()).status_code == 201
        assert (await create()).status_code == 429


@pytest.mark.asyncio
async def test_creations_in_flight_past_the_limit_are_refused_without_a_store_read(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst is shed at once: it does not queue behind the store it would load."""
    async with apikit.running(
        store, tmp_path, max_sessions_per_user=100, max_concurrent_starts=2
    ) as api:
        await api.template()
        bob = await api.user("bob")
        reads, release, both_counted = 0, asyncio.Event(), asyncio.Event()
        get_template, count_sessions = store.get_template, store.count_sessions

        async def held_get_template(name: str) -> Any:
            await release.wait()
            return await get_template(name)

        async def counted(**kwargs: Any) -> int:
            nonlocal reads
            if kwargs == {"states": sessions._STARTING_STATES}:  # the slot's count, no other
                reads += 1
                if reads == 2:
                    both_counted.set()
            return await count_sessions(**kwargs)

        monkeypatch.setattr(store, "get_template", held_get_template)
        monkeypatch.setattr(store, "count_sessions", counted)

        def create() -> Any:
            return api.client.post("/api/v1/sessions", json={"template": "firefox"}, headers=bob)

        held = [asyncio.create_task(create()) for _ in range(2)]
        await asyncio.wait_for(both_counted.wait(), 10)  # both counted, both held
        refused = await create()
        assert_error(refused, 429, "too_many_starts")
        assert refused.headers["Retry-After"] == "2"
        assert reads == 2
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [201, 201]


@pytest.mark.asyncio
async def test_max_concurrent_starts_zero_means_no_limit(store: Store, tmp_path: Path) -> None:
    async with apikit.running(
        store, tmp_path, max_sessions_per_user=100, max_concurrent_starts=0
    ) as api:
        await api.template()
        for _ in range(12):
            await api.session(api.admin)
