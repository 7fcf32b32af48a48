"""Logging in, every way a request can fail authentication, roles, and policy/audit hooks."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apikit
import httpx
import jwt
import pytest
from apikit import ADMIN, ADMIN_PASSWORD, assert_error, bearer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_auth import hs512

from streamspace_controlplane import auth, http
from streamspace_controlplane.openapi import Operation
from streamspace_controlplane.routes.api import all_operations
from streamspace_controlplane.store.base import Store
from streamspace_sdk.hooks import AuditRecord, Principal
from streamspace_sdk.hookspecs import hookimpl
from streamspace_sdk.testing.clock import FakeClock

PROTECTED = [op for op in all_operations() if op.auth != "public"]
ADMIN_ONLY = [op for op in all_operations() if op.auth == "admin"]


def _url(op: Operation) -> str:
    return re.sub(r"{[^}]+}", "s-0123456789abcdef", op.path)


async def _call(client: httpx.AsyncClient, op: Operation, headers: dict[str, str]):
    body: Any = {} if op.request is not None else None
    return await client.request(op.method, _url(op), json=body, headers=headers)


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- logging in --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_login_returns_a_token_that_works(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path, jwt_ttl=600.0) as api:
        before = datetime.now(UTC)
        response = await api.client.post(
            "/api/v1/auth/login", json={"username": ADMIN, "password": ADMIN_PASSWORD}
        )
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"token", "expires_at"}
        expires = datetime.fromisoformat(body["expires_at"])
        assert before + timedelta(seconds=598) <= expires <= before + timedelta(seconds=602)
        claims = jwt.decode(body["token"], apikit.SECRET, algorithms=["HS256"])
        assert (claims["sub"], claims["role"]) == (ADMIN, "admin")
        users = await api.client.get("/api/v1/users", headers=bearer(body["token"]))
        assert users.status_code == 200


@pytest.mark.asyncio
async def test_wrong_password_and_unknown_user_get_one_answer(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        wrong = await api.client.post(
            "/api/v1/auth/login", json={"username": ADMIN, "password": "nope-nope"}
        )
        unknown = await api.client.post(
            "/api/v1/auth/login", json={"username": "ghost", "password": "nope-nope"}
        )
        assert assert_error(wrong, 401, "unauthorized") == assert_error(unknown, 401)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"\xff\xfe", 400, None),
        (b"[]", 422, "body"),
        (b'{"username": "admin"}', 422, "body.password"),
        (b'{"password": "x"}', 422, "body.username"),
        (b'{"username": "admin", "password": 5}', 422, "body.password"),
        (b'{"username": "admin", "password": "x", "otp": 1}', 422, "body.otp"),
    ],
)
async def test_login_body_errors(
    store: Store, tmp_path: Path, body: bytes, status: int, field: str | None
) -> None:
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.post(
            "/api/v1/auth/login", content=body, headers={"content-type": "application/json"}
        )
        error = assert_error(response, status, "bad_request" if status == 400 else None)
        if field is not None:
            assert error["code"] == "validation_error"
            assert field in [f["field"] for f in error["fields"]]


@pytest.mark.asyncio
async def test_failed_logins_are_throttled_then_allowed_after_the_window(
    store: Store, tmp_path: Path
) -> None:
    clock = FakeClock()
    cp = apikit.build(store, tmp_path, login_attempts=3, login_window=60.0)
    cp.extras[auth.LOGIN_THROTTLE] = auth.LoginThrottle(3, 60.0, clock=clock)
    async with apikit.running(store, tmp_path, cp=cp) as api:
        bad = {"username": ADMIN, "password": "wrong-password"}
        for _ in range(3):
            assert_error(await api.client.post("/api/v1/auth/login", json=bad), 401)
            await clock.advance(1)
        good = {"username": ADMIN, "password": ADMIN_PASSWORD}
        blocked = await api.client.post("/api/v1/auth/login", json=good)
        error = assert_error(blocked, 429, "too_many_requests")
        assert blocked.headers["Retry-After"] == "57"
        assert "57 s" in error["message"]
        # Another user from the same address is not blocked.
        other = await api.client.post(
            "/api/v1/auth/login", json={"username": "nobody", "password": "whatever-1"}
        )
        assert_error(other, 401)
        await clock.advance(57)
        allowed = await api.client.post("/api/v1/auth/login", json=good)
        assert allowed.status_code == 200, allowed.text


# -- every way to fail authentication ----------------------------------------------------


def _alg_none_token() -> str:
    now = int(datetime.now(UTC).timestamp())
    claims = {"sub": ADMIN, "role": "admin", "kind": "api", "iat": now, "exp": now + 600}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    claims = {"sub": ADMIN, "role": "admin", "kind": "api", "iat": now, "exp": now + 600}
    claims.update(changes)
    return claims


def _token(secret: str, **changes: Any) -> str:
    return jwt.encode(_claims(**changes), secret, algorithm="HS256")


FAILURES: dict[str, Callable[[], dict[str, str]]] = {
    "no token": lambda: {},
    "empty header": lambda: {"Authorization": ""},
    "basic auth": lambda: {"Authorization": "Basic YWRtaW46YWRtaW4="},
    "bearer without token": lambda: {"Authorization": "Bearer"},
    "not a jwt": lambda: bearer("not-a-token"),
    "expired": lambda: bearer(_token(apikit.SECRET, exp=int(datetime.now(UTC).timestamp()) - 1)),
    "wrong signature": lambda: bearer(_token("w" * 40)),
    "alg none": lambda: bearer(_alg_none_token()),
    "hs512": lambda: bearer(hs512(_claims(), apikit.SECRET)),
    "unknown user": lambda: bearer(_token(apikit.SECRET, sub="ghost")),
    "agent token": lambda: bearer(auth.new_agent_token("a")[0]),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", list(FAILURES))
async def test_every_protected_route_refuses(store: Store, tmp_path: Path, failure: str) -> None:
    async with apikit.running(store, tmp_path) as api:
        headers = FAILURES[failure]()
        for op in PROTECTED:
            response = await _call(api.client, op, headers)
            error = assert_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), op.path
            if failure == "no token":
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert "authentication required" in error["message"]
            if failure == "expired":
                assert "expired" in error["message"]


@pytest.mark.asyncio
async def test_a_deleted_users_token_is_refused(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        bob = await api.user("bob")
        assert (await api.client.get("/api/v1/templates", headers=bob)).status_code == 200
        assert (await api.client.delete("/api/v1/users/bob", headers=api.admin)).status_code == 204
        response = await api.client.get("/api/v1/templates", headers=bob)
        assert "no longer exists" in assert_error(response, 401, "unauthorized")["message"]


@pytest.mark.asyncio
async def test_users_are_refused_every_admin_route(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        bob = await api.user("bob")
        for op in ADMIN_ONLY:
            error = assert_error(await _call(api.client, op, bob), 403, "forbidden")
            assert "admin" in error["message"], op.path
        audit = await api.cp.store.list_audit(limit=500)
        assert sum(1 for a in audit if a.action == "auth.denied") == len(ADMIN_ONLY)


@pytest.mark.asyncio
async def test_a_role_change_in_the_store_wins_over_the_token(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        # A token claiming admin for a plain user is only as good as the stored role.
        await api.user("bob")
        forged = _token(apikit.SECRET, sub="bob", role="admin")
        assert_error(await api.client.get("/api/v1/users", headers=bearer(forged)), 403)


# -- policy and audit hooks --------------------------------------------------------------


class Policy:
    """Denies bob the catalog, lets carol list agents, and breaks for dave."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    @hookimpl
    def authorize(self, principal: Principal, action: str, resource: str) -> bool | None:
        self.calls.append((principal.username, action, resource))
        if principal.username == "bob" and action == "template.list":
            return False
        if principal.username == "carol" and action == "agent.list":
            return True
        if principal.username == "dave" and action == "session.list":
            raise RuntimeError("policy service down")
        return None


class Sink:
    """Keeps audit records, and fails once to show a broken sink changes nothing."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.failed = False

    @hookimpl
    def audit_event(self, record: AuditRecord) -> None:
        self.records.append(record)
        if not self.failed:
            self.failed = True
            raise RuntimeError("SIEM unreachable")


@pytest.mark.asyncio
async def test_policy_plugins_decide_first(store: Store, tmp_path: Path) -> None:
    policy = Policy()
    async with apikit.running(store, tmp_path, plugins=[policy]) as api:
        bob = await api.user("bob")
        carol = await api.user("carol")
        dave = await api.user("dave")
        assert_error(await api.client.get("/api/v1/templates", headers=bob), 403, "forbidden")
        assert (await api.client.get("/api/v1/templates", headers=carol)).status_code == 200
        assert (await api.client.get("/api/v1/agents", headers=carol)).status_code == 200
        assert_error(await api.client.get("/api/v1/agents", headers=bob), 403)
        # An exception in a policy is a denial, never a grant.
        assert_error(await api.client.get("/api/v1/sessions", headers=dave), 403)
        assert ("bob", "template.list", "templates") in policy.calls


@pytest.mark.asyncio
async def test_audit_hooks_receive_mutations_logins_and_refusals(store: Store, tmp_path: Path):
    sink = Sink()
    async with apikit.running(store, tmp_path, plugins=[sink]) as api:
        await api.template("firefox")
        bob = await api.user("bob")
        session = await api.session(bob)
        await api.client.post("/api/v1/auth/login", json={"username": "bob", "password": "x"})
        await api.client.get("/api/v1/users", headers=bob)
        actions = [(r.actor, r.action, r.resource) for r in sink.records]
        assert (ADMIN, "auth.login", f"user/{ADMIN}") in actions
        assert (ADMIN, "template.create", "template/firefox") in actions
        assert (ADMIN, "user.create", "user/bob") in actions
        assert ("bob", "session.create", f"session/{session['id']}") in actions
        assert ("anonymous", "auth.login_failed", "user/bob") in actions
        assert ("bob", "auth.denied", "users") in actions
        stored = [(a.actor, a.action, a.resource) for a in await api.cp.store.list_audit(500)]
        assert set(actions) <= set(stored)


@pytest.mark.asyncio
async def test_require_user_defaults_to_the_method_and_path(store: Store, tmp_path: Path) -> None:
    policy = Policy()
    async with apikit.running(store, tmp_path, plugins=[policy]) as api:

        async def extra(request: Request) -> Response:
            principal = await http.require_user(request)
            return JSONResponse({"user": principal.username})

        api.app.router.routes.append(Route("/plugin/extra", extra))
        response = await api.client.get("/plugin/extra", headers=api.admin)
        assert response.json() == {"user": ADMIN}
        assert (ADMIN, "http.get", "/plugin/extra") in policy.calls
