"""Regression tests for what ``test_openapi_fuzz.py`` found, one request each.

* The document described its own body and the event stream's as a JSON string.
* An ``offset`` or ``last_event_id`` past 2**63 - 1 reached the store, which could not bind
  it: a 500 for the session list, an event stream that broke after its 200.
* ``Content-Length: ²`` passed ``str.isdigit`` and failed in ``int``: a 500.
* ``Last-Event-ID: ²`` or of 5,000 digits fails in ``int`` in ``routes/events.py``: a 500
  (fixed: 422).
* A body value of another JSON type than documented (``false`` for an integer) was
  converted and the request accepted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import apikit
import httpx
import pytest
from apikit import ADMIN, ADMIN_PASSWORD, assert_error, bearer, read_events

from streamspace_controlplane.app import create_app
from streamspace_controlplane.routes import events as event_routes
from streamspace_controlplane.store.base import Store

TIMEOUT_S = 10.0
"""Guard on every stream read."""
MAX_INT64 = 2**63 - 1
"""The largest integer SQLite and PostgreSQL hold."""


@pytest.mark.asyncio
async def test_document_types_its_own_body_and_the_event_stream(
    store: Store, tmp_path: Path
) -> None:
    """The document is a JSON object, and each event of a stream is an object with a
    string ``data``: neither is a JSON string, as they were documented."""
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.get("/api/v1/openapi.json")
    doc = response.json()
    assert isinstance(doc, dict)
    itself = doc["paths"]["/api/v1/openapi.json"]["get"]["responses"]["200"]["content"]
    assert itself == {"application/json": {"schema": {"type": "object"}}}
    events = doc["paths"]["/api/v1/sessions/{session_id}/events"]["get"]["responses"]["200"]
    event = events["content"]["text/event-stream"]["schema"]
    assert event["type"] == "object"
    assert event["properties"]["data"] == {"type": "string"}
    assert event["properties"]["id"] == {"type": "string"}
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert [m["schema"] for m in metrics.values()] == [{"type": "string"}]


@pytest.mark.asyncio
async def test_offsets_and_ids_past_int64_are_refused(store: Store, tmp_path: Path) -> None:
    """A query integer the store cannot hold is a 422 naming it, not a 500; the largest
    it holds is an ordinary (empty) answer."""
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        session = await api.session(api.admin)
        largest = await api.client.get(
            "/api/v1/sessions", params={"offset": MAX_INT64}, headers=api.admin
        )
        assert largest.status_code == 200, largest.text
        assert largest.json()["items"] == []
        for url, name in (
            ("/api/v1/sessions", "offset"),
            (f"/api/v1/sessions/{session['id']}/events", "last_event_id"),
        ):
            response = await api.client.get(url, params={name: MAX_INT64 + 1}, headers=api.admin)
            error = assert_error(response, 422, "validation_error")
            assert error["fields"][0]["field"] == f"query.{name}"


@pytest.mark.asyncio
async def test_a_last_event_id_header_past_int64_streams(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``Last-Event-ID`` past every id the store can hold resumes after everything: the
    stream stays up (keep-alive comments flow) instead of failing in the store after its 200."""
    monkeypatch.setattr(event_routes, "KEEPALIVE_S", 0.05)
    cp = apikit.build(store, tmp_path)
    async with (
        apikit.served(create_app(cp)) as base,
        httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as client,
    ):
        login = {"username": ADMIN, "password": ADMIN_PASSWORD}
        admin = bearer((await client.post("/api/v1/auth/login", json=login)).json()["token"])
        created = await client.post("/api/v1/templates", json={"name": "firefox"}, headers=admin)
        assert created.status_code == 201, created.text
        session = await client.post("/api/v1/sessions", json={"template": "firefox"}, headers=admin)
        assert session.status_code == 201, session.text
        url = f"/api/v1/sessions/{session.json()['id']}/events"
        headers = {**admin, "Last-Event-ID": str(MAX_INT64 + 10)}
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            got = await asyncio.wait_for(
                read_events(response.aiter_lines(), 1, comments=True), TIMEOUT_S
            )
            assert got == [{"comment": "keep-alive"}]


@pytest.mark.asyncio
@pytest.mark.parametrize("declared", ["²", "9" * 5000, "0" * 40 + "12"])
async def test_content_length_that_int_refuses_is_not_a_500(
    store: Store, tmp_path: Path, declared: str
) -> None:
    """Whatever ``Content-Length`` says, the answer is the body's own (here: empty, 400),
    or 413 for a number over the limit; never a 500. uvicorn refuses such a header
    itself; another server may pass it on."""
    async with apikit.running(store, tmp_path) as api:
        headers = [
            (b"Authorization", api.admin["Authorization"].encode()),
            (b"Content-Length", declared.encode("latin-1")),  # as a server decodes it
        ]
        response = await api.client.post("/api/v1/sessions", headers=headers, content=b"")
    if declared.startswith("9"):
        assert_error(response, 413, "payload_too_large")
    else:
        assert_error(response, 400, "bad_request")


@pytest.mark.asyncio
@pytest.mark.parametrize("header", ["²", "9" * 5000])
async def test_last_event_id_header_that_int_refuses_is_422(
    store: Store, tmp_path: Path, header: str
) -> None:
    """A ``Last-Event-ID`` that is not an event id is a 422 naming the header, not a 500."""
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        session = await api.session(api.admin)
        url = f"/api/v1/sessions/{session['id']}/events"
        headers = [
            (b"Authorization", api.admin["Authorization"].encode()),
            (b"Last-Event-ID", header.encode("latin-1")),  # as a server decodes it
        ]
        response = await api.client.get(url, headers=headers)
    error = assert_error(response, 422, "validation_error")
    assert error["fields"][0]["field"] == "header.Last-Event-ID"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "resources": {"memory_request_mib": False}}, "body.resources"),
        ({"name": "x", "vnc_port": "5900"}, "body.vnc_port"),
        ({"name": "x", "vnc_port": 5900.0}, "body.vnc_port"),
        ({"name": "x", "persistent_home": 1}, "body.persistent_home"),
    ],
)
async def test_a_body_value_of_another_json_type_is_refused(
    store: Store, tmp_path: Path, body: dict[str, object], field: str
) -> None:
    """A body is JSON and the document gives each field's JSON type: another type is a
    422 naming the field, not converted (``false`` to ``0``, ``"5900"`` to ``5900``)."""
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.post("/api/v1/templates", json=body, headers=api.admin)
        error = assert_error(response, 422, "validation_error")
        assert error["fields"][0]["field"].startswith(field), error
        fine = {"name": "x", "vnc_port": 5901, "resources": {"memory_request_mib": 512}}
        created = await api.client.post("/api/v1/templates", json=fine, headers=api.admin)
        assert created.status_code == 201, created.text
