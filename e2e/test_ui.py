"""The web UI in a real browser: Playwright drives Debian's Chromium, headless.

Against the real stack (``cp`` and ``agent`` from conftest: a control plane process and an
agent process with the ``process`` platform, so a session is a real Xvnc with xterm), a
person logs in, starts a desktop from the catalog, watches it reach ``running``, opens it
in the noVNC viewer, sees the desktop, and stops it again.

Chromium is Debian's package (``apt-get install chromium``; ``.ci/run`` installs it), not
a browser Playwright downloads. The screenshots go to the test's ``tmp_path``; the test
prints where.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import ADMIN_PASSWORD, Agent, ControlPlane, get_session
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_MS = 30_000
"""Bound on a desktop reaching ``running`` (Xvnc start on a loaded 2-core host)."""

NON_BLANK = """
() => {
  const canvas = document.querySelector("#screen canvas");
  if (!canvas || !canvas.width || !canvas.height) return null;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  for (let i = 0; i < data.length && colours.size < 64; i += 4) {
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
  return colours.size > 1
    ? {width: canvas.width, height: canvas.height, colours: colours.size}
    : null;
}
"""
"""Return the canvas's size and (up to 64) distinct colours once it is not all one colour."""


def chromium() -> str:
    """Return the path of Debian's Chromium; fail saying how to install it."""
    assert CHROMIUM.is_file(), f"no {CHROMIUM}: apt-get install chromium (as .ci/run does)"
    return str(CHROMIUM)


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, launched by Playwright."""
    executable = chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture
async def page(browser: Browser, cp: ControlPlane) -> AsyncIterator[Page]:
    """A fresh browser tab on the control plane; fails the test on a script error or a CSP
    violation in any page it showed."""
    context = await browser.new_context(base_url=cp.url, viewport={"width": 1280, "height": 900})
    tab = await context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"script error: {error}"))

    def console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Uncaught" in message.text:
            problems.append(f"console: {message.text}")

    tab.on("console", console)
    try:
        yield tab
    finally:
        await context.close()
    assert not problems, problems


async def log_in(page: Page, password: str) -> None:
    await page.get_by_label("Username").fill("admin")
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()


@pytest.mark.asyncio
async def test_ui_logs_in_starts_a_desktop_shows_it_and_stops_it(
    page: Page, cp: ControlPlane, admin: httpx.AsyncClient, agent: Agent, tmp_path: Path
) -> None:
    # Any page sends a stranger to log in, and back afterwards.
    await page.goto("/ui/catalog")
    await page.wait_for_url(re.compile(r"/ui/login\?next="))
    await log_in(page, ADMIN_PASSWORD)
    await page.wait_for_url(re.compile(r"/ui/catalog$"))
    await expect(page.locator("#whoami")).to_have_text("admin (admin)")

    # Start a desktop from the catalog: the sessions page follows its start.
    await page.get_by_role("button", name="Start Desktop").click()
    await page.wait_for_url(re.compile(r"/ui/sessions\?started=s-[0-9a-f]{16}$"))
    session_id = page.url.rsplit("=", 1)[1]
    row = page.locator(f'tr[data-session="{session_id}"]')
    await expect(row).to_have_attribute("data-state", "running", timeout=START_TIMEOUT_MS)
    await expect(page.locator("#notice")).to_contain_text(f"Session {session_id} is running")
    history = row.locator("ol.events li")
    await expect(history.last).to_contain_text("running")
    shown = await history.all_inner_texts()
    assert any("scheduled" in line for line in shown), shown  # the progress, event by event
    assert any("starting" in line for line in shown), shown
    assert (await get_session(admin, session_id))["state"] == "running"
    await page.screenshot(path=tmp_path / "sessions.png")

    # The viewer: noVNC over /vnc/{id} shows the desktop (xterm on Xvnc), not a blank canvas.
    await row.get_by_role("link", name=f"Open the desktop of {session_id}").click()
    await page.wait_for_url(re.compile(rf"/ui/sessions/{session_id}/view$"))
    await expect(page.locator("body")).to_have_attribute("data-vnc", "connected")
    drawn = await page.wait_for_function(NON_BLANK, timeout=START_TIMEOUT_MS)
    canvas: dict[str, Any] = await drawn.json_value()
    assert canvas["width"] >= 640, canvas
    assert canvas["height"] >= 480, canvas
    assert canvas["colours"] > 1, canvas
    shot = tmp_path / "viewer.png"
    await page.screenshot(path=shot)
    await page.locator("#screen canvas").screenshot(path=tmp_path / "desktop.png")
    print(f"\nscreenshots: {shot} and {tmp_path / 'desktop.png'}")

    # Hibernate and wake it from the sessions page: compute goes, then comes back.
    await page.goto("/ui/sessions")
    row = page.locator(f'tr[data-session="{session_id}"]')
    await row.get_by_role("button", name=f"Hibernate {session_id}").click()
    await expect(row).to_have_attribute("data-state", "hibernated", timeout=START_TIMEOUT_MS)
    assert (await get_session(admin, session_id))["state"] == "hibernated"
    await row.get_by_role("button", name=f"Wake {session_id}").click()
    await expect(row).to_have_attribute("data-state", "running", timeout=START_TIMEOUT_MS)
    assert (await get_session(admin, session_id))["state"] == "running"

    # Stop it from the sessions page; the viewer's socket ends with the desktop.
    await row.get_by_role("button", name=f"Stop {session_id}").click()
    await expect(row).to_have_attribute("data-desired", "stopped")
    await expect(row).to_have_attribute("data-state", "stopped", timeout=START_TIMEOUT_MS)
    await expect(row.get_by_role("button", name=f"Start {session_id}")).to_be_visible()
    assert (await get_session(admin, session_id))["state"] == "stopped"


@pytest.mark.asyncio
async def test_ui_login_with_a_wrong_password_shows_the_apis_error(
    page: Page, cp: ControlPlane
) -> None:
    await page.goto("/ui/login")
    await log_in(page, "not-the-password")
    error = page.get_by_role("alert")
    await expect(error).to_be_visible()
    await expect(error).to_have_text("Login failed: wrong username or password")
    assert page.url == f"{cp.url}/ui/login"
    assert await page.evaluate("sessionStorage.length") == 0
    # Another page still sends the browser back to log in.
    await page.goto("/ui/sessions")
    await page.wait_for_url(re.compile(r"/ui/login\?next=%2Fui%2Fsessions$"))


@pytest.mark.asyncio
async def test_ui_admin_pages_list_agents_create_a_user_and_issue_and_revoke_a_token(
    page: Page, cp: ControlPlane, admin: httpx.AsyncClient, agent: Agent, tmp_path: Path
) -> None:
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before a change
    await page.goto("/ui/login?next=/ui/admin/agents")
    await log_in(page, ADMIN_PASSWORD)
    await page.wait_for_url(re.compile(r"/ui/admin/agents$"))
    row = page.locator(f'tr[data-agent="{agent.agent_id}"]')
    await expect(row).to_contain_text("online")
    await expect(row).to_contain_text("process")
    await expect(row.get_by_role("button", name=f"Delete {agent.agent_id}")).to_be_enabled()
    await page.screenshot(path=tmp_path / "agents.png")

    await page.get_by_role("link", name="Users").click()
    await page.get_by_label("Username").fill("alice")
    await page.get_by_label("Password (at least 8 characters)").fill("alice-password")
    await page.get_by_role("button", name="Create user").click()
    await expect(page.locator("#notice")).to_have_text("Created user alice.")
    await expect(page.locator('tr[data-user="alice"]')).to_contain_text("user")
    users = (await admin.get("/api/v1/users")).json()
    assert {"username": "alice", "role": "user"}.items() <= next(
        u for u in users if u["username"] == "alice"
    ).items()
    # A second one of the same name: the API's error, in the page.
    await page.get_by_label("Username").fill("alice")
    await page.get_by_label("Password (at least 8 characters)").fill("alice-password")
    await page.get_by_role("button", name="Create user").click()
    await expect(page.get_by_role("alert")).to_contain_text("Creating the user failed: ")
    await page.locator('tr[data-user="alice"]').get_by_role("button", name="Disable alice").click()
    await expect(page.locator("#notice")).to_have_text("Disabled alice.")
    await expect(page.locator('tr[data-user="alice"]')).to_contain_text("(disabled)")
    users = (await admin.get("/api/v1/users")).json()
    assert next(u for u in users if u["username"] == "alice")["disabled"] is True
    await page.screenshot(path=tmp_path / "users.png")

    await page.get_by_role("link", name="Agent tokens").click()
    await page.get_by_label("Agent id").fill("other-agent")
    await page.get_by_role("button", name="Issue token").click()
    secret = page.locator("#new-token-value")
    await expect(secret).not_to_be_empty()
    tokens = (await admin.get("/api/v1/agent-tokens", params={"agent_id": "other-agent"})).json()
    assert len(tokens) == 1, tokens
    row = page.locator(f'tr[data-token="{tokens[0]["token_id"]}"]')
    await row.get_by_role("button", name=f"Revoke {tokens[0]['token_id']}").click()
    await expect(page.locator("#notice")).to_have_text(f"Revoked {tokens[0]['token_id']}.")
    await expect(row.get_by_role("button", name=f"Revoke {tokens[0]['token_id']}")).to_be_disabled()
    revoked = (await admin.get("/api/v1/agent-tokens", params={"agent_id": "other-agent"})).json()
    assert revoked[0]["revoked_at"] is not None
    await page.screenshot(path=tmp_path / "tokens.png")
    print(f"\nscreenshots in {tmp_path}")
