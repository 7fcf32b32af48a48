"""Helpers of the REST API tests: an app on a given store, clients, and shortcuts.

Not a conftest: the API test modules import it, so what each test builds stays visible.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import argon2
import httpx
import pytest
from agentsim import serve
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from streamspace_controlplane import auth
from streamspace_controlplane.app import build_control_plane, create_app
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store.base import Store
from streamspace_sdk.hooks import Hooks, make_plugin_manager
from streamspace_sdk.settings import PluginSettings

ADMIN = "admin"
ADMIN_PASSWORD = "admin-password-1"
SECRET = "s" * 40
USER_PASSWORD = "user-password-1"


def isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine out of a test: no settings from the environment, cheap hashes.

    Every variable the settings read is removed. argon2 runs at its cheapest, since the
    tests check behaviour, not hash cost (hashes record their parameters, so verifying
    works the same).
    """
    for name in [*ControlPlaneSettings.model_fields, *PluginSettings.model_fields]:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(
        auth, "PASSWORD_HASHER", argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    )


def make_settings(tmp_path: Path, **overrides: Any) -> ControlPlaneSettings:
    """Settings for a test app: everything the tests rely on given explicitly."""
    values: dict[str, Any] = {
        "streamspace_home": tmp_path / "home",
        "jwt_secret": SECRET,
        "admin_username": ADMIN,
        "admin_password": ADMIN_PASSWORD,
        "max_sessions_per_user": 5,
        "login_attempts": 5,
        "login_window": 300.0,
        "jwt_ttl": 3600.0,
        "reconcile_interval": 3600.0,
    }
    values.update(overrides)
    return ControlPlaneSettings(**values)


def make_hooks(plugins: Iterable[object] = ()) -> Hooks:
    """Hooks with only ``plugins`` (no installed entry points)."""
    return Hooks(
        make_plugin_manager(
            settings=PluginSettings(streamspace_load_plugins=""),
            plugins=plugins,
            load_entrypoints=False,
        )
    )


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Check the status and the error shape; return the ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "fields"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


@dataclass
class Api:
    """A running test app and a client for it."""

    cp: ControlPlane
    app: Starlette
    client: httpx.AsyncClient
    admin: dict[str, str] = field(default_factory=dict)
    """Headers of the bootstrap admin."""

    async def login(self, username: str, password: str) -> dict[str, str]:
        """Log in and return the Authorization header."""
        response = await self.client.post(
            "/api/v1/auth/login", json={"username": username, "password": password}
        )
        assert response.status_code == 200, response.text
        return bearer(response.json()["token"])

    async def user(self, username: str, role: str = "user") -> dict[str, str]:
        """Create a user (as the admin) and return their Authorization header."""
        response = await self.client.post(
            "/api/v1/users",
            json={"username": username, "password": USER_PASSWORD, "role": role},
            headers=self.admin,
        )
        assert response.status_code == 201, response.text
        return await self.login(username, USER_PASSWORD)

    async def template(self, name: str = "firefox", **fields: Any) -> dict[str, Any]:
        """Create a template (as the admin) and return it."""
        body = {"name": name, "display_name": name.title(), "image": f"lscr.io/{name}"}
        body.update(fields)
        response = await self.client.post("/api/v1/templates", json=body, headers=self.admin)
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def session(
        self, headers: dict[str, str], template: str = "firefox", **fields: Any
    ) -> dict[str, Any]:
        """Start a session and return it."""
        response = await self.client.post(
            "/api/v1/sessions", json={"template": template, **fields}, headers=headers
        )
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result


def build(
    store: Store, tmp_path: Path, *, plugins: Iterable[object] = (), **overrides: Any
) -> ControlPlane:
    """Build a control plane on ``store`` with test settings."""
    return build_control_plane(
        make_settings(tmp_path, **overrides), store=store, hooks=make_hooks(plugins)
    )


@asynccontextmanager
async def running(
    store: Store,
    tmp_path: Path,
    *,
    plugins: Iterable[object] = (),
    cp: ControlPlane | None = None,
    **overrides: Any,
) -> AsyncIterator[Api]:
    """Run the app (lifespan included) on ``store`` and yield a logged-in admin client."""
    if cp is None:
        cp = build(store, tmp_path, plugins=plugins, **overrides)
    app = create_app(cp)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://testserver"
        ) as client,
    ):
        api = Api(cp=cp, app=app, client=client)
        api.admin = await api.login(ADMIN, ADMIN_PASSWORD)
        yield api


@asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free local port (agentsim's ``serve``); yield its
    ``http://`` base URL."""
    async with serve(app) as url:
        yield "http" + url.removeprefix("ws")


async def read_events(
    lines: AsyncIterator[str], count: int, *, comments: bool = False
) -> list[dict[str, Any]]:
    """Read ``count`` Server-Sent Events (or comments, when asked) from a line stream.

    Each event is ``{"id", "event", "data"}`` with ``data`` parsed as JSON; a comment is
    ``{"comment": text}``.
    """
    found: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for line in lines:
        if line == "":
            if current:
                if "data" in current:
                    current["data"] = json.loads(current["data"])
                if "data" in current or ("comment" in current and comments):
                    found.append(current)
                current = {}
                if len(found) == count:
                    return found
            continue
        name, _, value = line.partition(":")
        if name == "":
            current["comment"] = value.strip()
        else:
            current[name] = value.removeprefix(" ")
    raise AssertionError(f"stream ended after {len(found)} of {count} events")
