"""Users: the bootstrap admin and ``/api/v1/users``."""

from __future__ import annotations

import logging
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import apikit
import pytest
from apikit import ADMIN, USER_PASSWORD, assert_error

from streamspace_controlplane import auth
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.http import ApiError
from streamspace_controlplane.services import users
from streamspace_controlplane.store.base import Store
from streamspace_sdk.errors import ConfigError
from streamspace_sdk.hooks import Principal


@asynccontextmanager
async def connected(store: Store, tmp_path: Path, **overrides: Any) -> AsyncIterator[ControlPlane]:
    """A control plane on the fixture's store (connected and migrated), without the app."""
    yield apikit.build(store, tmp_path, **overrides)


# -- the bootstrap admin -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_generated_admin_password_is_written_0600_and_logged_once(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "streamspace.controlplane")
    async with connected(store, tmp_path, admin_password=None) as cp:
        password = await users.ensure_admin(cp)
        assert password is not None
        assert len(password) >= 16
        path = cp.settings.streamspace_home / "admin-password"
        assert path.read_text() == password + "\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        admin = await cp.store.get_user(ADMIN)
        assert admin is not None
        assert admin.role == "admin"
        assert await auth.verify_password(admin.password_hash, password)
        assert await users.ensure_admin(cp) is None  # exists now: nothing generated
    logged = [r.getMessage() for r in caplog.records if "Generated admin password" in r.message]
    assert logged == [f"Generated admin password written to {path} (user 'admin')"]
    assert password not in caplog.text


@pytest.mark.asyncio
async def test_generated_password_logs_in_through_the_api(store: Store, tmp_path: Path) -> None:
    cp = apikit.build(store, tmp_path, admin_password=None)
    # running() logs in with ADMIN_PASSWORD, so log in by hand here.
    import httpx
    from asgi_lifespan import LifespanManager

    from streamspace_controlplane.app import create_app

    app = create_app(cp)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://t") as c,
    ):
        password = (cp.settings.streamspace_home / "admin-password").read_text().strip()
        response = await c.post(
            "/api/v1/auth/login", json={"username": ADMIN, "password": password}
        )
        assert response.status_code == 200


@pytest.mark.asyncio
async def test_configured_admin_password_is_used_and_updated(store: Store, tmp_path: Path):
    async with connected(store, tmp_path, admin_password="first-password") as cp:
        assert await users.ensure_admin(cp) is None
        assert not (cp.settings.streamspace_home / "admin-password").exists()
        changed = apikit.build(store, tmp_path, admin_password="second-password")
        assert await users.ensure_admin(changed) is None
        admin = await store.get_user(ADMIN)
        assert admin is not None
        assert await auth.verify_password(admin.password_hash, "second-password")
        assert not await auth.verify_password(admin.password_hash, "first-password")
        unset = apikit.build(store, tmp_path, admin_password=None)
        assert await users.ensure_admin(unset) is None  # an existing admin is left alone
        assert await auth.verify_password(
            (await store.get_user(ADMIN)).password_hash,  # type: ignore[union-attr]
            "second-password",
        )


@pytest.mark.asyncio
async def test_a_bad_admin_username_names_the_variable(store: Store, tmp_path: Path) -> None:
    async with connected(store, tmp_path, admin_username="bad name!") as cp:
        with pytest.raises(ConfigError, match="ADMIN_USERNAME"):
            await users.ensure_admin(cp)


# -- /api/v1/users -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_list_and_delete_users(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        created = await api.client.post(
            "/api/v1/users",
            json={"username": "alice.smith@corp", "password": "long-enough", "role": "admin"},
            headers=api.admin,
        )
        assert created.status_code == 201
        assert created.headers["Location"] == "/api/v1/users/alice.smith@corp"
        body = created.json()
        assert set(body) == {"username", "role", "disabled", "created_at"}
        assert (body["username"], body["role"], body["disabled"]) == (
            "alice.smith@corp",
            "admin",
            False,
        )

        listed = await api.client.get("/api/v1/users", headers=api.admin)
        assert listed.status_code == 200
        assert [(u["username"], u["role"]) for u in listed.json()] == [
            ("admin", "admin"),
            ("alice.smith@corp", "admin"),
        ]
        assert "password" not in listed.text
        assert "$argon2" not in listed.text

        deleted = await api.client.delete("/api/v1/users/alice.smith@corp", headers=api.admin)
        assert deleted.status_code == 204
        assert deleted.content == b""
        again = await api.client.delete("/api/v1/users/alice.smith@corp", headers=api.admin)
        assert_error(again, 404, "not_found")


@pytest.mark.asyncio
async def test_the_default_role_is_user(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.post(
            "/api/v1/users", json={"username": "bob", "password": "long-enough"}, headers=api.admin
        )
        assert response.json()["role"] == "user"


@pytest.mark.asyncio
async def test_a_taken_username_is_a_conflict(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        body = {"username": "admin", "password": "long-enough"}
        response = await api.client.post("/api/v1/users", json=body, headers=api.admin)
        assert "already exists" in assert_error(response, 409, "conflict")["message"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "bad name", "password": "long-enough"}, "body.username"),
        ({"username": "-dash", "password": "long-enough"}, "body.username"),
        ({"username": "", "password": "long-enough"}, "body.username"),
        ({"username": "x" * 65, "password": "long-enough"}, "body.username"),
        ({"username": "bob", "password": "short"}, "body.password"),
        ({"username": "bob", "password": "long-enough", "role": "root"}, "body.role"),
        ({"password": "long-enough"}, "body.username"),
        ({"username": "bob"}, "body.password"),
        ({"username": "bob", "password": "long-enough", "admin": True}, "body.admin"),
    ],
)
async def test_user_validation_errors(
    store: Store, tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.post("/api/v1/users", json=body, headers=api.admin)
        error = assert_error(response, 422, "validation_error")
        assert field in [f["field"] for f in error["fields"]]
        assert field in error["message"]
        assert "long-enough" not in response.text  # values are never echoed


@pytest.mark.asyncio
async def test_an_admin_cannot_delete_themselves(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        response = await api.client.delete(f"/api/v1/users/{ADMIN}", headers=api.admin)
        assert "your own user" in assert_error(response, 409, "conflict")["message"]


@pytest.mark.asyncio
async def test_a_user_with_active_sessions_cannot_be_deleted(store: Store, tmp_path: Path):
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        session = await api.session(bob)
        refused = await api.client.delete("/api/v1/users/bob", headers=api.admin)
        assert "1 session(s)" in assert_error(refused, 409, "conflict")["message"]
        gone = await api.client.delete(f"/api/v1/sessions/{session['id']}", headers=bob)
        assert gone.status_code == 204
        assert (await api.client.delete("/api/v1/users/bob", headers=api.admin)).status_code == 204


# -- PATCH /api/v1/users/{username} --------------------------------------------------------


async def _patch(api: apikit.Api, username: str, body: dict[str, Any]) -> Any:
    return await api.client.patch(f"/api/v1/users/{username}", json=body, headers=api.admin)


@pytest.mark.asyncio
async def test_a_disabled_user_is_refused_until_enabled_and_logs_in_anew(
    store: Store, tmp_path: Path
) -> None:
    """Disabled: login and the old token are 403 ``user_disabled`` (a wrong password is
    still the 401 of any wrong password); enabled: login works, the old token stays dead."""
    async with apikit.running(store, tmp_path) as api:
        bob = await api.user("bob")
        assert (await api.client.get("/api/v1/sessions", headers=bob)).status_code == 200

        disabled = await _patch(api, "bob", {"disabled": True})
        assert disabled.status_code == 200, disabled.text
        assert (disabled.json()["username"], disabled.json()["disabled"]) == ("bob", True)
        old = await api.client.get("/api/v1/sessions", headers=bob)
        assert "'bob' is disabled" in assert_error(old, 403, "user_disabled")["message"]
        login = await api.client.post(
            "/api/v1/auth/login", json={"username": "bob", "password": USER_PASSWORD}
        )
        assert "'bob' is disabled" in assert_error(login, 403, "user_disabled")["message"]
        wrong = await api.client.post(
            "/api/v1/auth/login", json={"username": "bob", "password": "not-the-password"}
        )
        assert_error(wrong, 401, "unauthorized")
        listed = (await api.client.get("/api/v1/users", headers=api.admin)).json()
        assert [u["disabled"] for u in listed if u["username"] == "bob"] == [True]

        enabled = await _patch(api, "bob", {"disabled": False})
        assert enabled.json()["disabled"] is False
        again = await api.login("bob", USER_PASSWORD)
        assert (await api.client.get("/api/v1/sessions", headers=again)).status_code == 200
        stale = await api.client.get("/api/v1/sessions", headers=bob)
        assert "revoked" in assert_error(stale, 401, "unauthorized")["message"]

        audit = [(a.action, a.resource, a.detail) for a in await api.cp.store.list_audit(100)]
        assert ("user.update", "user/bob", {"disabled": True}) in audit
        assert ("user.update", "user/bob", {"disabled": False}) in audit
        assert ("auth.login_refused", "user/bob") in [(a, r) for a, r, _ in audit]


@pytest.mark.asyncio
async def test_a_disabled_user_keeps_their_sessions(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template()
        bob = await api.user("bob")
        session = await api.session(bob)
        assert (await _patch(api, "bob", {"disabled": True})).status_code == 200
        kept = await api.client.get(f"/api/v1/sessions/{session['id']}", headers=api.admin)
        assert kept.json()["desired_state"] == "running"
        denied = await api.client.post(f"/api/v1/sessions/{session['id']}/vnc-token", headers=bob)
        assert_error(denied, 403, "user_disabled")
        for_bob = await api.client.post(
            "/api/v1/sessions", json={"template": "firefox", "user": "bob"}, headers=api.admin
        )
        message = assert_error(for_bob, 422, "validation_error")["message"]
        assert "'bob' is disabled" in message


@pytest.mark.asyncio
async def test_role_and_password_change(store: Store, tmp_path: Path) -> None:
    """A new password works at once and cuts off the user's tokens; a role takes effect
    on the next request, since the role comes from the store."""
    async with apikit.running(store, tmp_path) as api:
        bob = await api.user("bob")
        promoted = await _patch(api, "bob", {"role": "admin"})
        assert promoted.json()["role"] == "admin"
        assert (await api.client.get("/api/v1/users", headers=bob)).status_code == 200

        changed = await _patch(api, "bob", {"password": "a-new-password"})
        assert changed.status_code == 200, changed.text
        assert "a-new-password" not in changed.text
        stale = await api.client.get("/api/v1/users", headers=bob)
        assert_error(stale, 401, "unauthorized")
        bob = await api.login("bob", "a-new-password")
        old = await api.client.post(
            "/api/v1/auth/login", json={"username": "bob", "password": USER_PASSWORD}
        )
        assert_error(old, 401)

        demoted = await _patch(api, "bob", {"role": "user"})
        assert demoted.json()["role"] == "user"
        assert_error(await api.client.get("/api/v1/users", headers=bob), 403, "forbidden")
        audit = [(a.action, a.detail) for a in await api.cp.store.list_audit(100)]
        assert ("user.update", {"password": "changed"}) in audit
        assert ("user.update", {"role": "user"}) in audit


@pytest.mark.asyncio
async def test_an_unchanged_or_empty_patch_changes_nothing(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        bob = await api.user("bob")
        for body in ({}, {"disabled": False}, {"role": "user"}, {"disabled": None}):
            response = await _patch(api, "bob", body)
            assert response.status_code == 200, response.text
            assert (response.json()["role"], response.json()["disabled"]) == ("user", False)
        assert (await api.client.get("/api/v1/sessions", headers=bob)).status_code == 200
        assert "user.update" not in [a.action for a in await api.cp.store.list_audit(100)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "message"),
    [({"disabled": True}, "cannot disable your own user"), ({"role": "user"}, "own role")],
)
async def test_an_admin_cannot_disable_or_demote_themselves(
    store: Store, tmp_path: Path, body: dict[str, Any], message: str
) -> None:
    async with apikit.running(store, tmp_path) as api:
        response = await _patch(api, ADMIN, body)
        assert message in assert_error(response, 409, "conflict")["message"]
        assert (await api.client.get("/api/v1/users", headers=api.admin)).status_code == 200


@pytest.mark.asyncio
async def test_the_last_enabled_admin_cannot_be_disabled_or_demoted(
    store: Store, tmp_path: Path
) -> None:
    """Through the API the caller is an enabled admin who cannot change themselves; a
    policy plugin or the command line may act for someone else, so the service checks."""
    async with connected(store, tmp_path) as cp:
        await users.ensure_admin(cp)
        await users.create_user(cp, "carol", "long-enough", "admin", actor="cli")
        someone = Principal(username="cli", role="admin")
        await users.update_user(cp, someone, "carol", disabled=True)
        with pytest.raises(ApiError) as disabling:
            await users.update_user(cp, someone, ADMIN, disabled=True)
        with pytest.raises(ApiError) as demoting:
            await users.update_user(cp, someone, ADMIN, role="user")
        for refused in (disabling, demoting):
            assert refused.value.status == 409
            assert "last enabled admin" in refused.value.message
        admin = await cp.store.get_user(ADMIN)
        assert admin is not None
        assert (admin.role, admin.disabled) == ("admin", False)
        await users.update_user(cp, someone, "carol", disabled=False)
        await users.update_user(cp, someone, ADMIN, disabled=True)  # carol is left


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"disabled": "yes"}, "body.disabled"),
        ({"disabled": 1}, "body.disabled"),
        ({"role": "root"}, "body.role"),
        ({"password": "short"}, "body.password"),
        ({"disable": True}, "body.disable"),
    ],
)
async def test_user_patch_validation_errors(
    store: Store, tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.user("bob")
        error = assert_error(await _patch(api, "bob", body), 422, "validation_error")
        assert field in [f["field"] for f in error["fields"]]


@pytest.mark.asyncio
async def test_patching_an_unknown_user_or_as_a_user_is_refused(
    store: Store, tmp_path: Path
) -> None:
    async with apikit.running(store, tmp_path) as api:
        bob = await api.user("bob")
        assert_error(await _patch(api, "nobody", {"disabled": True}), 404, "not_found")
        as_bob = await api.client.patch(
            f"/api/v1/users/{ADMIN}", json={"disabled": True}, headers=bob
        )
        assert_error(as_bob, 403, "forbidden")
