"""The web UI's routes: pages, security headers, static files and noVNC.

The pages' behaviour in a browser (logging in, starting a session, the viewer) is tested
end to end in ``e2e/test_ui.py``; these check what the server sends.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import apikit
import httpx
import pytest
import pytest_asyncio
from apikit import assert_error

from streamspace_controlplane.routes import ui
from streamspace_controlplane.store.sqlite import SqliteStore

SESSION_ID = "s-0123456789abcdef"


@pytest_asyncio.fixture
async def client(sqlite_store: SqliteStore, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a running app, with no credentials: the UI's files need none."""
    async with apikit.running(sqlite_store, tmp_path) as api:
        yield api.client


def csp(response: httpx.Response) -> dict[str, str]:
    """Return the response's Content-Security-Policy as directive to sources."""
    policy = response.headers["content-security-policy"]
    directives = (part.strip().split(" ", 1) for part in policy.split(";"))
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def assert_secure(response: httpx.Response, host: str = "testserver") -> None:
    policy = csp(response)
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == f"'self' ws://{host} wss://{host}"
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("page", ui.PAGES, ids=[page.name for page in ui.PAGES])
@pytest.mark.asyncio
async def test_every_page_is_served_with_its_script_and_the_security_headers(
    client: httpx.AsyncClient, page: ui.Page
) -> None:
    response = await client.get(page.path.format(session_id=SESSION_ID))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    assert_secure(response)
    text = response.text
    assert text.startswith("<!doctype html>")
    assert '<html lang="en">' in text
    assert f"<h1>{page.title}</h1>" in text
    assert f'<script type="module" src="/static/js/{page.script}"></script>' in text
    assert '<div id="error" class="error" role="alert" hidden></div>' in text
    assert "<script>" not in text  # no inline script: the policy would block it anyway
    assert 'style="' not in text


@pytest.mark.asyncio
async def test_nav_marks_the_current_page_and_hides_admin_links_until_the_script_shows_them(
    client: httpx.AsyncClient,
) -> None:
    text = (await client.get("/ui/catalog")).text
    assert '<a href="/ui/catalog" aria-current="page">Catalog</a>' in text
    assert '<li><a href="/ui/sessions">My sessions</a></li>' in text
    for path in ("/ui/admin/agents", "/ui/admin/users", "/ui/admin/tokens"):
        assert re.search(rf'<li data-admin hidden><a href="{path}">', text), path
    login = (await client.get("/ui/login")).text
    assert '<nav aria-label="Main" id="nav" hidden>' in login
    viewer = (await client.get(f"/ui/sessions/{SESSION_ID}/view")).text
    assert '<nav aria-label="Main" id="nav">' in viewer
    assert '/view"' not in viewer.split("<main")[0]  # reached from a session, not the nav


@pytest.mark.parametrize("path", ["/", "/ui", "/ui/"])
@pytest.mark.asyncio
async def test_the_root_sends_a_browser_to_the_sessions_page(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/sessions"


@pytest.mark.asyncio
async def test_static_files_are_revalidated_and_carry_the_security_headers(
    client: httpx.AsyncClient,
) -> None:
    script = await client.get("/static/js/api.js")
    assert script.status_code == 200
    assert script.headers["content-type"].split(";")[0] in {
        "text/javascript",
        "application/javascript",
    }
    assert script.headers["cache-control"] == "no-cache"
    assert_secure(script)
    again = await client.get("/static/js/api.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304
    style = await client.get("/static/app.css")
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")


@pytest.mark.asyncio
async def test_a_missing_static_file_is_the_api_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/static/js/nope.js"), 404, "not_found")
    assert_error(await client.get("/static/../routes/ui.py"), 404)


@pytest.mark.asyncio
async def test_a_host_header_that_is_not_a_host_is_not_copied_into_the_policy(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/ui/login", headers={"Host": "evil; script-src *"})
    assert csp(response)["connect-src"] == "'self'"
    assert csp(response)["script-src"] == "'self'"
    ipv6 = await client.get("/ui/login", headers={"Host": "[::1]:8080"})
    assert csp(ipv6)["connect-src"] == "'self' ws://[::1]:8080 wss://[::1]:8080"


def test_every_script_a_page_names_and_every_module_they_import_exists() -> None:
    js = ui.STATIC_DIR / "js"
    for page in ui.PAGES:
        assert (js / page.script).is_file(), page.script
    for module in js.glob("*.js"):
        for target in re.findall(r'from "(\./[^"]+)"', module.read_text()):
            assert (js / target).is_file(), f"{module.name} imports {target}"


def test_novnc_is_installed_in_the_package() -> None:
    """The set-up step copied noVNC from npm, and the wheel carries it (hatch artifacts).

    Troubleshooting: run ``controlplane/scripts/vendor_novnc.sh`` (``./dev test`` does),
    then recreate the tox env (``./dev test -e controlplane -r``) so the wheel is rebuilt.
    """
    assert ui.novnc_installed(), f"no {ui.NOVNC_ENTRY}: run {ui.NOVNC_SETUP_COMMAND}"
    core = ui.NOVNC_ENTRY.parent
    for target in re.findall(r'from "(\.[^"]+)"', ui.NOVNC_ENTRY.read_text()):
        assert (core / target).resolve().is_file(), f"rfb.js imports {target}"


@pytest.mark.asyncio
async def test_novnc_is_served_from_the_static_files_with_a_long_cache(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/static/vendor/novnc/core/rfb.js")
    assert response.status_code == 200, f"run {ui.NOVNC_SETUP_COMMAND}"
    assert "export default class RFB" in response.text
    assert response.headers["cache-control"] == "public, max-age=86400"
    assert_secure(response)


@pytest.mark.asyncio
async def test_the_viewer_page_loads_novnc_when_it_is_there(client: httpx.AsyncClient) -> None:
    text = (await client.get(f"/ui/sessions/{SESSION_ID}/view")).text
    assert 'id="screen"' in text
    assert "novnc-missing" not in text
    assert f'data-novnc-setup="{ui.NOVNC_SETUP_COMMAND}"' in text


@pytest.mark.asyncio
async def test_the_viewer_page_says_what_to_run_when_novnc_is_missing(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ui, "NOVNC_ENTRY", tmp_path / "nowhere" / "rfb.js")
    response = await client.get(f"/ui/sessions/{SESSION_ID}/view")
    assert response.status_code == 200
    text = response.text
    assert '<div id="novnc-missing" class="error" role="alert">' in text
    assert "noVNC is not installed" in text
    assert f"<code>{ui.NOVNC_SETUP_COMMAND}</code>" in text
    assert "novnc-missing" not in (await client.get("/ui/sessions")).text
