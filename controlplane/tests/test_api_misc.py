"""Probes, metrics, the OpenAPI document, and the error shape of everything else."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import apikit
import httpx
import pytest
from apikit import assert_error
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import Route

from streamspace_controlplane.http import MAX_BODY_BYTES
from streamspace_controlplane.models import AgentRecord
from streamspace_controlplane.routes.api import all_operations
from streamspace_controlplane.services import templates
from streamspace_controlplane.store.base import Conflict, NotFound, Store, StoreError
from streamspace_sdk.platform import Capacity

# -- probes and metrics ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_health_and_ready(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        health = await api.client.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "healthy"})
        assert (await api.client.head("/health")).status_code == 200
        ready = await api.client.get("/ready")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert body["problems"] == []
        assert body["schema_version"] >= 1


@pytest.mark.asyncio
async def test_not_ready_when_the_schema_is_behind(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with apikit.running(store, tmp_path) as api:

        async def behind() -> int:
            return 0

        monkeypatch.setattr(api.cp.store, "schema_version", behind)
        response = await api.client.get("/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not_ready"
        assert "streamspace-controlplane migrate" in body["problems"][0]
        assert (await api.client.get("/health")).status_code == 200  # still alive


@pytest.mark.asyncio
async def test_not_ready_when_the_store_is_unreachable(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with apikit.running(store, tmp_path) as api:

        async def down() -> None:
            raise StoreError("connection refused")

        monkeypatch.setattr(api.cp.store, "ping", down)
        response = await api.client.get("/ready")
        assert response.status_code == 503
        assert response.json()["problems"] == ["store unreachable: connection refused"]
        assert response.json()["schema_version"] is None


@pytest.mark.asyncio
async def test_metrics_refresh_from_the_store(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        await api.session(api.admin)
        await api.cp.store.register_agent(
            AgentRecord(agent_id="a1", platform="process", capacity=Capacity(max_sessions=0))
        )
        response = await api.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == CONTENT_TYPE_LATEST
        text = response.text
        assert 'streamspace_sessions{state="pending"} 1.0' in text
        assert 'streamspace_sessions{state="running"} 0.0' in text
        assert 'streamspace_agents{status="online"} 1.0' in text
        assert 'streamspace_agents{status="offline"} 0.0' in text
        assert "streamspace_command_round_trip_seconds" in text


@pytest.mark.asyncio
async def test_metrics_count_the_event_loops_tasks_and_the_process(
    store: Store, tmp_path: Path
) -> None:
    """A soak reads leaks off /metrics: the loop's tasks, open files and memory."""
    async with apikit.running(store, tmp_path) as api:
        parked = [asyncio.create_task(asyncio.Event().wait()) for _ in range(100)]
        try:
            text = (await api.client.get("/metrics")).text
        finally:
            for task in parked:
                task.cancel()
            await asyncio.gather(*parked, return_exceptions=True)
        with_parked = _gauge(text, "streamspace_event_loop_tasks")
        assert with_parked >= 100
        after = _gauge((await api.client.get("/metrics")).text, "streamspace_event_loop_tasks")
        assert after <= with_parked - 90  # the app's own tasks come and go; 100 went
        assert _gauge(text, "process_open_fds") > 0
        assert _gauge(text, "process_resident_memory_bytes") > 0


def _gauge(text: str, name: str) -> float:
    values = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exactly once in /metrics"
    return float(values[0])


# -- errors ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unknown_paths_and_methods_use_the_error_shape(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        missing = await api.client.get("/api/v1/nothing-here")
        assert "/api/v1/nothing-here" in assert_error(missing, 404, "not_found")["message"]
        wrong = await api.client.put("/api/v1/sessions", headers=api.admin)
        assert_error(wrong, 405, "method_not_allowed")
        assert set(wrong.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}
        wrong_item = await api.client.post("/api/v1/templates/firefox", headers=api.admin)
        assert set(wrong_item.headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}


@pytest.mark.asyncio
async def test_a_body_too_large_is_refused(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        big = b'{"template": "' + b"x" * MAX_BODY_BYTES + b'"}'
        response = await api.client.post(
            "/api/v1/sessions",
            content=big,
            headers={**api.admin, "content-type": "application/json"},
        )
        assert_error(response, 413, "payload_too_large")

        async def chunks() -> AsyncIterator[
            bytes
        ]:  # no Content-Length: the limit holds while reading
            for _ in range(3):
                yield b" " * MAX_BODY_BYTES

        streamed = await api.client.post("/api/v1/sessions", content=chunks(), headers=api.admin)
        assert_error(streamed, 413, "payload_too_large")


@pytest.mark.asyncio
async def test_store_failures_are_503_and_bugs_are_500(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with apikit.running(store, tmp_path) as api:

        async def store_down(*_args: Any) -> None:
            raise StoreError("database is locked")

        monkeypatch.setattr(templates, "list_templates", store_down)
        unavailable = await api.client.get("/api/v1/templates", headers=api.admin)
        message = assert_error(unavailable, 503, "unavailable")["message"]
        assert "locked" not in message  # internals stay in the log

        async def conflict(*_args: Any) -> None:
            raise Conflict("template 'x' already exists")

        monkeypatch.setattr(templates, "list_templates", conflict)
        taken = await api.client.get("/api/v1/templates", headers=api.admin)
        assert_error(taken, 409, "conflict")

        async def gone(*_args: Any) -> None:
            raise NotFound("no such row")

        monkeypatch.setattr(templates, "list_templates", gone)
        assert_error(await api.client.get("/api/v1/templates", headers=api.admin), 404)

        async def bug(*_args: Any) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(templates, "list_templates", bug)
        transport = httpx.ASGITransport(api.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/api/v1/templates", headers=api.admin)
        error = assert_error(response, 500, "internal_error")
        assert "secret" not in error["message"]


# -- the OpenAPI document ----------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            found.extend(_refs(value))
        return found
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _check_schema(schema: Any, where: str) -> None:
    """A JSON Schema (2020-12) object: typed, a reference, or a combination of those."""
    assert isinstance(schema, dict), where
    keys = {"type", "$ref", "anyOf", "oneOf", "allOf", "const", "enum", "items"}
    assert keys & set(schema) or schema == {}, f"{where}: {schema}"
    if schema.get("type") == "object":
        for name, prop in schema.get("properties", {}).items():
            _check_schema(prop, f"{where}.{name}")
        assert set(schema.get("required", [])) <= set(schema.get("properties", {})), where
    for key in ("anyOf", "oneOf", "allOf"):
        for index, part in enumerate(schema.get(key, [])):
            _check_schema(part, f"{where}.{key}[{index}]")
    if isinstance(schema.get("items"), dict):
        _check_schema(schema["items"], f"{where}.items")


@pytest.mark.asyncio
async def test_openapi_lists_every_route_with_valid_schemas(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.get("/api/v1/openapi.json")
        assert response.status_code == 200
        doc = response.json()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"]
    assert doc["info"]["version"]
    paths: dict[str, dict[str, Any]] = doc["paths"]

    # Every HTTP route the app serves is documented, method by method (the web UI's pages
    # are marked out of the schema: they are HTML for browsers, not API).
    served = set()
    for route in api.app.routes:
        if isinstance(route, Route) and route.include_in_schema:
            for method in route.methods or ():
                if method != "HEAD":
                    served.add((method.lower(), route.path))
    documented = {(m, p) for p, ops in paths.items() for m in ops}
    assert served == documented
    for path in ("/health", "/ready", "/metrics", "/api/v1/auth/login", "/api/v1/users",
                 "/api/v1/users/{username}", "/api/v1/templates", "/api/v1/templates/{name}",
                 "/api/v1/sessions", "/api/v1/sessions/{session_id}",
                 "/api/v1/sessions/{session_id}/events", "/api/v1/agents",
                 "/api/v1/agents/{agent_id}", "/api/v1/agents/{agent_id}/tokens",
                 "/api/v1/agent-tokens", "/api/v1/agent-tokens/{token_id}",
                 "/api/v1/openapi.json"):  # fmt: skip
        assert path in paths, path

    schemas = doc["components"]["schemas"]
    for name, schema in schemas.items():
        _check_schema(schema, name)
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

    operation_ids = []
    for path, operations in paths.items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            operation_ids.append(op["operationId"])
            assert op["summary"], where
            assert op["responses"], where
            assert any(code.startswith("2") for code in op["responses"]), where
            for param in re.findall(r"{(\w+)}", path):
                assert {"name": param, "in": "path", "required": True,
                        "schema": {"type": "string"}} in op["parameters"], where  # fmt: skip
            for code, answer in op["responses"].items():
                if code.startswith(("4", "5")):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, where
            if path.startswith("/api/v1/") and path not in (
                "/api/v1/auth/login",
                "/api/v1/openapi.json",
            ):
                assert op["security"] == [{"bearer": []}], where
                assert {"401", "403"} <= set(op["responses"]), where
            else:
                assert "security" not in op, where
    assert len(operation_ids) == len(set(operation_ids))

    create = paths["/api/v1/sessions"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/SessionCreate"}
    assert schemas["SessionCreate"]["required"] == ["template"]
    assert schemas["SessionCreate"]["additionalProperties"] is False
    assert create["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SessionOut"
    }
    assert {"429", "422", "400"} <= set(create["responses"])
    listing = paths["/api/v1/sessions"]["get"]
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")
    assert limit["in"] == "query"
    assert limit["schema"]["maximum"] == 500
    agents = paths["/api/v1/agents"]["get"]["responses"]["200"]["content"]["application/json"]
    assert agents["schema"] == {"type": "array", "items": {"$ref": "#/components/schemas/AgentOut"}}
    events = paths["/api/v1/sessions/{session_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert {"name": "Last-Event-ID", "in": "header"}.items() <= next(
        p for p in events["parameters"] if p["in"] == "header"
    ).items()
    assert "description" in schemas["SessionOut"]["properties"]["generation"]


def test_operations_are_unique_and_documented() -> None:
    seen = set()
    for op in all_operations():
        key = (op.method, op.path)
        assert key not in seen, key
        seen.add(key)
        assert op.endpoint.__doc__, op.path
