"""Templates: ``/api/v1/templates`` and the ``TEMPLATES_FILE`` loaded at start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import apikit
import pytest
from apikit import assert_error

from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.services import templates
from streamspace_controlplane.store.base import Store
from streamspace_sdk.errors import ConfigError

FULL = {
    "name": "firefox",
    "display_name": "Firefox",
    "description": "A browser",
    "image": "lscr.io/linuxserver/firefox:latest",
    "command": ["firefox", "--kiosk"],
    "vnc_port": 5901,
    "resources": {
        "cpu_request_m": 500,
        "cpu_limit_m": 2000,
        "memory_request_mib": 1024,
        "memory_limit_mib": 2048,
    },
    "env": {"LANG": "en_US.UTF-8"},
    "persistent_home": True,
    "platform": "kubernetes",
    "region": "us-east-1",
    "labels": {"gpu": "false"},
    "platform_options": {"node_selector": {"pool": "desktops"}},
}


@asynccontextmanager
async def connected(store: Store, tmp_path: Path, **overrides: Any) -> AsyncIterator[ControlPlane]:
    """A control plane on the fixture's store (connected and migrated), without the app."""
    yield apikit.build(store, tmp_path, **overrides)


@pytest.mark.asyncio
async def test_template_crud(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        bob = await api.user("bob")
        created = await api.client.post("/api/v1/templates", json=FULL, headers=api.admin)
        assert created.status_code == 201, created.text
        assert created.headers["Location"] == "/api/v1/templates/firefox"
        body = created.json()
        for key, value in FULL.items():
            assert body[key] == value, key
        assert body["created_at"] == body["updated_at"]

        # Everyone reads.
        listed = await api.client.get("/api/v1/templates", headers=bob)
        assert [t["name"] for t in listed.json()] == ["firefox"]
        one = await api.client.get("/api/v1/templates/firefox", headers=bob)
        assert one.json() == body

        # Admins replace; unspecified fields go back to their defaults.
        replaced = await api.client.put(
            "/api/v1/templates/firefox",
            json={"name": "firefox", "image": "firefox:2", "vnc_port": 5999},
            headers=api.admin,
        )
        assert replaced.status_code == 200, replaced.text
        new = replaced.json()
        assert (new["image"], new["vnc_port"], new["env"], new["command"]) == (
            "firefox:2",
            5999,
            {},
            [],
        )
        assert new["created_at"] == body["created_at"]
        assert new["updated_at"] >= body["updated_at"]
        without_name = await api.client.put(
            "/api/v1/templates/firefox", json={"image": "firefox:3"}, headers=api.admin
        )
        assert without_name.json()["image"] == "firefox:3"

        deleted = await api.client.delete("/api/v1/templates/firefox", headers=api.admin)
        assert deleted.status_code == 204
        assert_error(await api.client.get("/api/v1/templates/firefox", headers=bob), 404)
        assert (await api.client.get("/api/v1/templates", headers=bob)).json() == []


@pytest.mark.asyncio
async def test_template_not_found_and_conflict(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template("firefox")
        dup = await api.client.post(
            "/api/v1/templates", json={"name": "firefox"}, headers=api.admin
        )
        assert_error(dup, 409, "conflict")
        for method in ("GET", "PUT", "DELETE"):
            response = await api.client.request(
                method, "/api/v1/templates/nope", json={"image": "x"}, headers=api.admin
            )
            assert "'nope'" in assert_error(response, 404, "not_found")["message"]


@pytest.mark.asyncio
async def test_put_cannot_rename(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template("firefox")
        response = await api.client.put(
            "/api/v1/templates/firefox", json={"name": "chrome"}, headers=api.admin
        )
        error = assert_error(response, 422, "validation_error")
        assert error["fields"] == [
            {"field": "body.name", "message": "must equal the name in the path"}
        ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Firefox"}, "body.name"),
        ({"name": "fire_fox"}, "body.name"),
        ({"name": "-firefox"}, "body.name"),
        ({"name": "x" * 64}, "body.name"),
        ({"vnc_port": 0}, "body.vnc_port"),
        ({"vnc_port": 70000}, "body.vnc_port"),
        ({"vnc_port": "high"}, "body.vnc_port"),
        ({"resources": {"cpu_request_m": -1}}, "body.resources.cpu_request_m"),
        ({"env": {"A": 1}}, "body.env.A"),
        ({"command": "firefox"}, "body.command"),
        ({"persistent_home": "maybe"}, "body.persistent_home"),
        ({"labels": ["a"]}, "body.labels"),
        ({"colour": "red"}, "body.colour"),
    ],
)
async def test_template_validation_errors(
    store: Store, tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    async with apikit.running(store, tmp_path) as api:
        body = {"name": "firefox", **change}
        response = await api.client.post("/api/v1/templates", json=body, headers=api.admin)
        error = assert_error(response, 422, "validation_error")
        assert field in [f["field"] for f in error["fields"]], error


@pytest.mark.asyncio
async def test_a_template_in_use_cannot_be_deleted(store: Store, tmp_path: Path) -> None:
    async with apikit.running(store, tmp_path) as api:
        await api.template("firefox")
        await api.template("chrome")
        bob = await api.user("bob")
        session = await api.session(bob, "firefox")
        refused = await api.client.delete("/api/v1/templates/firefox", headers=api.admin)
        assert "1 session(s)" in assert_error(refused, 409, "conflict")["message"]
        unused = await api.client.delete("/api/v1/templates/chrome", headers=api.admin)
        assert unused.status_code == 204
        # Once the session has stopped, the template may go.
        stopped = await api.client.patch(
            f"/api/v1/sessions/{session['id']}", json={"state": "stopped"}, headers=bob
        )
        assert stopped.json()["state"] == "stopped"
        freed = await api.client.delete("/api/v1/templates/firefox", headers=api.admin)
        assert freed.status_code == 204


# -- TEMPLATES_FILE ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_templates_file_is_loaded_at_start(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "templates.yaml"
    path.write_text(
        "templates:\n"
        "  - name: firefox\n"
        "    image: firefox:1\n"
        "    resources: {cpu_request_m: 500}\n"
        "  - name: xterm\n"
        "    command: [xterm]\n"
        "    labels: {os: linux}\n"
    )
    async with apikit.running(store, tmp_path, templates_file=path) as api:
        listed = (await api.client.get("/api/v1/templates", headers=api.admin)).json()
        assert [(t["name"], t["image"], t["command"]) for t in listed] == [
            ("firefox", "firefox:1", []),
            ("xterm", None, ["xterm"]),
        ]
        assert listed[0]["resources"]["cpu_request_m"] == 500


@pytest.mark.asyncio
async def test_templates_file_creates_updates_and_leaves_others(store: Store, tmp_path: Path):
    path = tmp_path / "templates.yaml"
    path.write_text("- name: firefox\n  image: firefox:1\n")
    async with connected(store, tmp_path, templates_file=path) as cp:
        first = await templates.load_templates_file(cp)
        assert [t.name for t in first] == ["firefox"]
        assert await templates.load_templates_file(cp) == []  # unchanged: nothing written
        await cp.store.create_template(first[0].model_copy(update={"name": "other"}))
        path.write_text("- name: firefox\n  image: firefox:2\n")
        second = await templates.load_templates_file(cp)
        assert [(t.name, t.image) for t in second] == [("firefox", "firefox:2")]
        assert second[0].created_at == first[0].created_at
        names = [t.name for t in await cp.store.list_templates()]
        assert names == ["firefox", "other"]
        audit = [(a.actor, a.action) for a in await cp.store.list_audit(100)]
        assert ("system", "template.create") in audit
        assert ("system", "template.update") in audit


@pytest.mark.asyncio
async def test_no_templates_file_loads_nothing(store: Store, tmp_path: Path) -> None:
    async with connected(store, tmp_path) as cp:
        assert await templates.load_templates_file(cp) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: [unclosed\n", "is not valid YAML"),
        ("just a string\n", "expected a list of templates"),
        ("templates: {name: x}\n", "expected a list of templates"),
        ("templates: []\nextra: 1\n", "unexpected top-level keys besides 'templates': extra"),
        ("- name: ok\n- 42\n", r"templates\[1\]: expected a mapping, got int"),
        ("- name: ok\n- name: Bad_Name\n", r"templates\[1\] \('Bad_Name'\): name: String"),
        ("- name: ok\n  vnc_port: 99999\n", r"templates\[0\] \('ok'\): vnc_port: Input"),
        ("- name: ok\n  colour: red\n", r"templates\[0\] \('ok'\): colour: Extra inputs"),
        ("- image: x\n", r"templates\[0\]: name: Field required"),
        ("- name: ok\n- name: ok\n", r"templates\[1\] \('ok'\): template 'ok' appears twice"),
    ],
)
async def test_a_bad_templates_file_names_the_variable_and_entry(
    store: Store, tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "templates.yaml"
    path.write_text(text)
    async with connected(store, tmp_path, templates_file=path) as cp:
        with pytest.raises(ConfigError, match=rf"^TEMPLATES_FILE: {path}: .*{message}"):
            await templates.load_templates_file(cp)
        assert await cp.store.list_templates() == []  # a bad file changes nothing


@pytest.mark.asyncio
async def test_a_missing_templates_file_is_an_error(store: Store, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    async with connected(store, tmp_path, templates_file=missing) as cp:
        with pytest.raises(ConfigError, match=rf"^TEMPLATES_FILE: cannot read {missing}"):
            await templates.load_templates_file(cp)


@pytest.mark.asyncio
async def test_a_bad_templates_file_fails_start_up(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "templates.yaml"
    path.write_text("- name: Bad\n")
    with pytest.raises(ConfigError, match="TEMPLATES_FILE"):
        async with apikit.running(store, tmp_path, templates_file=path):
            pass
