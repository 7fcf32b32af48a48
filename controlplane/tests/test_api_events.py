"""``GET /api/v1/sessions/{id}/events``: Server-Sent Events over a real server.

httpx's ASGI transport buffers whole responses, so these tests serve the app with uvicorn
on a free port and read the stream with ``client.stream`` as a browser would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import apikit
import httpx
import pytest
from apikit import ADMIN, ADMIN_PASSWORD, assert_error, bearer, read_events

from streamspace_controlplane.app import create_app
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.routes import events as event_routes
from streamspace_controlplane.scheduler import Scheduler
from streamspace_controlplane.store.base import Store

TIMEOUT_S = 10.0
"""Guard on every read: a broken stream fails the test instead of hanging it."""


@asynccontextmanager
async def live(
    store: Store, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlane, httpx.AsyncClient, dict[str, str]]]:
    """Serve the app; yield its control plane, a client and the admin's headers."""
    cp = apikit.build(store, tmp_path)
    async with (
        apikit.served(create_app(cp)) as base,
        httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as client,
    ):
        response = await client.post(
            "/api/v1/auth/login", json={"username": ADMIN, "password": ADMIN_PASSWORD}
        )
        assert response.status_code == 200, response.text
        yield cp, client, bearer(response.json()["token"])


async def _session(cp: ControlPlane, client: httpx.AsyncClient, admin: dict[str, str]) -> str:
    """Create a template and a session; let the scheduler's pass settle; return the id."""
    created = await client.post("/api/v1/templates", json={"name": "firefox"}, headers=admin)
    assert created.status_code == 201, created.text
    response = await client.post("/api/v1/sessions", json={"template": "firefox"}, headers=admin)
    assert response.status_code == 201, response.text
    await cast(Scheduler, cp.scheduler).run_once()  # its "no agent" event is stored now
    session_id: str = response.json()["id"]
    return session_id


async def _read(lines: AsyncIterator[str], count: int, **kwargs: Any) -> list[dict[str, Any]]:
    return await asyncio.wait_for(read_events(lines, count, **kwargs), TIMEOUT_S)


@pytest.mark.asyncio
async def test_stored_events_then_live_ones(store: Store, tmp_path: Path) -> None:
    async with live(store, tmp_path) as (cp, client, admin):
        sid = await _session(cp, client, admin)
        stored = await cp.store.list_session_events(sid)
        assert stored
        assert stored[0].detail == "created by admin"
        url = f"/api/v1/sessions/{sid}/events"
        async with client.stream("GET", url, headers=admin) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            lines = response.aiter_lines()
            replayed = await _read(lines, len(stored))
            assert [int(e["id"]) for e in replayed] == [e.id for e in stored]
            assert {e["event"] for e in replayed} == {"state"}
            assert replayed[0]["data"]["state"] == "pending"
            assert replayed[0]["data"]["detail"] == "created by admin"
            assert replayed[0]["data"]["session_id"] == sid

            # A live transition arrives while the stream is open.
            session = await cp.store.get_session(sid)
            assert session is not None
            await cp.events.transition(session, "failed", "image pull failed")
            (event,) = await _read(lines, 1)
            assert event["data"]["state"] == "failed"
            assert event["data"]["previous_state"] == "pending"
            assert event["data"]["detail"] == "image pull failed"
            assert int(event["id"]) > int(replayed[-1]["id"])

            # So does a change made through the API.
            patched = await client.patch(
                f"/api/v1/sessions/{sid}", json={"state": "stopped"}, headers=admin
            )
            assert patched.status_code == 200, patched.text
            asked, stopped = await _read(lines, 2)
            assert asked["data"]["detail"] == "admin asked for stopped"
            assert stopped["data"]["state"] == "stopped"


@pytest.mark.asyncio
async def test_last_event_id_resumes_after_that_event(store: Store, tmp_path: Path) -> None:
    async with live(store, tmp_path) as (cp, client, admin):
        sid = await _session(cp, client, admin)
        session = await cp.store.get_session(sid)
        assert session is not None
        for step in ("pulling image", "starting VNC"):
            await cp.events.record(session, None, step)
        stored = await cp.store.list_session_events(sid)
        assert len(stored) >= 3
        url = f"/api/v1/sessions/{sid}/events"
        resume = stored[-3].id
        for kwargs in (
            {"headers": {**admin, "Last-Event-ID": str(resume)}},
            {"headers": admin, "params": {"last_event_id": resume}},
        ):
            async with client.stream("GET", url, **kwargs) as response:
                assert response.status_code == 200
                got = await _read(response.aiter_lines(), 2)
                assert [int(e["id"]) for e in got] == [stored[-2].id, stored[-1].id]
                assert [e["data"]["detail"] for e in got] == ["pulling image", "starting VNC"]


@pytest.mark.asyncio
async def test_keep_alive_comments(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_routes, "KEEPALIVE_S", 0.05)
    async with live(store, tmp_path) as (cp, client, admin):
        sid = await _session(cp, client, admin)
        last = (await cp.store.list_session_events(sid))[-1].id
        url = f"/api/v1/sessions/{sid}/events"
        async with client.stream("GET", url, headers={**admin, "Last-Event-ID": str(last)}) as r:
            (comment,) = await _read(r.aiter_lines(), 1, comments=True)
            assert comment == {"comment": "keep-alive"}


@pytest.mark.asyncio
async def test_the_stream_ends_when_the_client_goes_away(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with live(store, tmp_path) as (cp, client, admin):
        sid = await _session(cp, client, admin)
        unsubscribed = asyncio.Event()
        unsubscribe = cp.events.unsubscribe

        def spy(session_id: str, queue: asyncio.Queue[Any]) -> None:
            unsubscribe(session_id, queue)
            if session_id == sid:
                unsubscribed.set()

        monkeypatch.setattr(cp.events, "unsubscribe", spy)
        async with client.stream("GET", f"/api/v1/sessions/{sid}/events", headers=admin) as r:
            await _read(r.aiter_lines(), 1)
        await asyncio.wait_for(unsubscribed.wait(), TIMEOUT_S)


@pytest.mark.asyncio
async def test_event_stream_errors(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        session = await api.session(api.admin)
        url = f"/api/v1/sessions/{session['id']}/events"
        assert_error(await api.client.get(url), 401, "unauthorized")
        bad = await api.client.get(url, headers={**api.admin, "Last-Event-ID": "yesterday"})
        error = assert_error(bad, 422, "validation_error")
        assert error["fields"][0]["field"] == "header.Last-Event-ID"
        negative = await api.client.get(f"{url}?last_event_id=-1", headers=api.admin)
        assert_error(negative, 422, "validation_error")
        missing = await api.client.get(
            "/api/v1/sessions/s-0000000000000000/events", headers=api.admin
        )
        assert_error(missing, 404, "not_found")
