"""The web UI: a few HTML pages, their scripts and styles, and noVNC, under ``/ui`` and ``/static``.

Every page is the same small HTML shell (:func:`render_page`) around a bit of markup of its
own; a vanilla JavaScript module per page (``static/js/``) fills it from the REST API with
the bearer token it keeps in ``sessionStorage``. No data is put into the HTML on the server,
so the pages are the same for everyone and need no authentication to fetch; everything
they show comes from the API, which checks the token.

The viewer imports noVNC's ES modules from ``/static/vendor/novnc/``: a copy of the npm
package that ``controlplane/scripts/vendor_novnc.sh`` makes and that is never committed.
When the copy is missing, the viewer page says what to run instead of failing silently.

Every response carries a Content-Security-Policy that allows only this origin (scripts,
styles, fetches, and WebSockets to this host for the viewer) and no framing.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = [
    "NOVNC_SETUP_COMMAND",
    "PAGES",
    "STATIC_DIR",
    "Page",
    "local_path",
    "novnc_installed",
    "render_page",
    "routes",
    "security_headers",
]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
"""The package's static files: ``app.css``, ``js/`` and (once set up) ``vendor/novnc/``."""
NOVNC_ENTRY = STATIC_DIR / "vendor" / "novnc" / "core" / "rfb.js"
"""The module the viewer imports; its absence means noVNC was not set up."""
NOVNC_SETUP_COMMAND = "controlplane/scripts/vendor_novnc.sh"
"""What to run (from the repository root) to put noVNC into the static files."""

STATIC_CACHE = "no-cache"
"""Our own scripts and styles: revalidated each time (a cheap 304 via ETag), so an upgrade
is seen at once; their URLs carry no version."""
VENDOR_CACHE = "public, max-age=86400"
"""noVNC's files: pinned by the lock file, so a day in the browser's cache is safe."""
PAGE_CACHE = "no-cache"
"""The pages: small shells, revalidated so an upgrade is seen at once."""

_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_LOCAL_PATH = re.compile(r"/(?![/\\])[^\\\x00-\x20\x7f]*")
"""A path of this site: one leading slash, and no backslash, space or control character,
which a browser's URL parser reads as a slash or drops (``/\\evil.example`` and
``/<tab>/evil.example`` both lead to ``//evil.example``, another site)."""


def security_headers(host: str | None) -> dict[str, str]:
    """Return the security headers of every UI response for a request to ``host``.

    ``connect-src`` names ``ws://`` and ``wss://`` of ``host`` explicitly, since older
    browsers do not count WebSockets as ``'self'``; a ``Host`` that is not a plain host
    name (and port) gets ``'self'`` alone rather than being copied into the header.
    """
    connect = "'self'"
    if host and _HOST.match(host):
        connect += f" ws://{host} wss://{host}"
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            # noVNC draws its cursor as a data: URL.
            "img-src 'self' data:",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def novnc_installed() -> bool:
    """Tell whether the static files hold noVNC (``vendor_novnc.sh`` was run)."""
    return NOVNC_ENTRY.is_file()


# -- pages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """One page of the UI: its path, title, script and the markup of its ``<main>``."""

    name: str
    """Short name; the ``data-page`` of ``<body>`` and the key of the nav link."""
    path: str
    """Where it is served."""
    title: str
    """``<title>`` and ``<h1>``."""
    script: str
    """Its module under ``/static/js/``."""
    main: str
    """Markup after the heading; static, with no data in it."""
    admin: bool = False
    """Listed in the nav for admins only (the API enforces it; this only hides links)."""
    nav: bool = True
    """Listed in the nav at all (the viewer is reached from a session, not the nav)."""
    public: bool = False
    """Shown before logging in (the login page): the nav stays hidden."""


_LOGIN = """
<form id="login-form" class="card narrow">
  <p><label for="username">Username</label>
  <input id="username" name="username" autocomplete="username" required maxlength="64"></p>
  <p><label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password"
    required maxlength="1024"></p>
  <p><button type="submit">Log in</button></p>
</form>
"""

_CATALOG = """
<p>Start a desktop from a template; its progress shows on <a href="/ui/sessions">My
sessions</a>.</p>
<ul id="templates" class="cards" aria-busy="true"></ul>
"""

_SESSIONS = """
<p class="controls">
  <button type="button" id="refresh">Refresh</button>
  <label id="all-users-label" hidden><input type="checkbox" id="all-users">
  Sessions of every user</label>
  <a href="/ui/catalog">Start another session</a>
</p>
<table id="sessions" aria-busy="true">
  <caption class="visually-hidden">Sessions, newest first</caption>
  <thead><tr><th scope="col">Session</th><th scope="col">State</th>
  <th scope="col">Progress</th><th scope="col">Agent</th><th scope="col">Created</th>
  <th scope="col">Actions</th></tr></thead>
  <tbody></tbody>
</table>
<p id="no-sessions" hidden>No sessions yet. <a href="/ui/catalog">Start one from the
catalog</a>.</p>
"""

_VIEWER = """
<p class="controls">
  <span id="vnc-state" role="status" aria-live="polite">Connecting…</span>
  <button type="button" id="reconnect" hidden>Reconnect</button>
  <button type="button" id="fullscreen">Full screen</button>
  <a href="/ui/sessions">Back to my sessions</a>
</p>
<div id="screen" class="screen" aria-label="Remote desktop"></div>
"""

_AGENTS = """
<p class="controls"><button type="button" id="refresh">Refresh</button></p>
<table id="agents" aria-busy="true">
  <caption class="visually-hidden">Agents</caption>
  <thead><tr><th scope="col">Agent</th><th scope="col">Status</th>
  <th scope="col">Platform</th><th scope="col">Region</th><th scope="col">Sessions</th>
  <th scope="col">Last heartbeat</th><th scope="col">Actions</th></tr></thead>
  <tbody></tbody>
</table>
"""

_USERS = """
<form id="user-form" class="card">
  <h2>New user</h2>
  <p><label for="new-username">Username</label>
  <input id="new-username" name="username" required maxlength="64" autocomplete="off"></p>
  <p><label for="new-password">Password (at least 8 characters)</label>
  <input id="new-password" name="password" type="password" required minlength="8"
    autocomplete="new-password"></p>
  <p><label for="new-role">Role</label>
  <select id="new-role" name="role"><option value="user">user</option>
  <option value="admin">admin</option></select></p>
  <p><button type="submit">Create user</button></p>
</form>
<table id="users" aria-busy="true">
  <caption class="visually-hidden">Users</caption>
  <thead><tr><th scope="col">Username</th><th scope="col">Role</th>
  <th scope="col">Created</th><th scope="col">Actions</th></tr></thead>
  <tbody></tbody>
</table>
"""

_TOKENS = """
<form id="token-form" class="card">
  <h2>Issue a token</h2>
  <p><label for="agent-id">Agent id</label>
  <input id="agent-id" name="agent_id" required maxlength="63" autocomplete="off"
    pattern="[A-Za-z0-9][A-Za-z0-9._\\-]*"></p>
  <p><button type="submit">Issue token</button></p>
  <div id="new-token" hidden>
    <p>Give this to the agent as <code>AGENT_TOKEN</code>; it is shown only now.</p>
    <p><output id="new-token-value" class="secret"></output></p>
  </div>
</form>
<table id="tokens" aria-busy="true">
  <caption class="visually-hidden">Agent tokens</caption>
  <thead><tr><th scope="col">Token id</th><th scope="col">Agent</th>
  <th scope="col">Created</th><th scope="col">Last used</th><th scope="col">Revoked</th>
  <th scope="col">Actions</th></tr></thead>
  <tbody></tbody>
</table>
"""

PAGES: tuple[Page, ...] = (
    Page("login", "/ui/login", "Log in", "login.js", _LOGIN, nav=False, public=True),
    Page("catalog", "/ui/catalog", "Catalog", "catalog.js", _CATALOG),
    Page("sessions", "/ui/sessions", "My sessions", "sessions.js", _SESSIONS),
    Page("viewer", "/ui/sessions/{session_id}/view", "Desktop", "viewer.js", _VIEWER, nav=False),
    Page("agents", "/ui/admin/agents", "Agents", "agents.js", _AGENTS, admin=True),
    Page("users", "/ui/admin/users", "Users", "users.js", _USERS, admin=True),
    Page("tokens", "/ui/admin/tokens", "Agent tokens", "tokens.js", _TOKENS, admin=True),
)
"""Every page, in nav order."""


def _nav(current: Page) -> str:
    links = []
    for page in PAGES:
        if not page.nav:
            continue
        here = ' aria-current="page"' if page is current else ""
        admin = " data-admin hidden" if page.admin else ""
        links.append(f'<li{admin}><a href="{page.path}"{here}>{html.escape(page.title)}</a></li>')
    return "\n".join(links)


def _novnc_missing() -> str:
    return (
        '<div id="novnc-missing" class="error" role="alert"><p><strong>The viewer cannot '
        "start: noVNC is not installed in this control plane's static files.</strong></p>"
        "<p>From the repository root run <code>"
        f"{html.escape(NOVNC_SETUP_COMMAND)}</code> (or <code>./dev up</code>, which runs "
        "it), then reinstall or restart the control plane.</p></div>"
    )


def render_page(page: Page) -> str:
    """Return the HTML of ``page``: the shared shell, its markup and its script."""
    title = html.escape(page.title)
    main = page.main
    extra = ""
    if page.name == "viewer":
        extra = f' data-novnc-setup="{html.escape(NOVNC_SETUP_COMMAND)}"'
        if not novnc_installed():
            main = _novnc_missing() + main
    nav_hidden = " hidden" if page.public else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · StreamSpace</title>
<link rel="stylesheet" href="/static/app.css">
<script type="module" src="/static/js/{page.script}"></script>
</head>
<body data-page="{page.name}"{extra}>
<a class="skip" href="#main">Skip to content</a>
<header class="bar">
<a class="brand" href="/ui/sessions">StreamSpace</a>
<nav aria-label="Main" id="nav"{nav_hidden}>
<ul>
{_nav(page)}
</ul>
<p class="who"><span id="whoami"></span>
<button type="button" id="logout" hidden>Log out</button></p>
</nav>
</header>
<main id="main" tabindex="-1">
<h1>{title}</h1>
<div id="error" class="error" role="alert" hidden></div>
<p id="notice" class="notice" role="status" aria-live="polite" hidden></p>
{main.strip()}
</main>
</body>
</html>
"""


def local_path(target: str) -> bool:
    """Tell whether sending a browser to ``target`` keeps it on this site."""
    return _LOCAL_PATH.fullmatch(target) is not None


def _page_endpoint(page: Page) -> Route:
    async def endpoint(request: Request) -> Response:
        headers = security_headers(request.headers.get("host"))
        headers["Cache-Control"] = PAGE_CACHE
        if page.name == "login" and not all(
            not target or local_path(target) for target in request.query_params.getlist("next")
        ):
            # The page's script goes to ``next`` after logging in; a link that would send
            # the browser to another site is answered before the script can run.
            return RedirectResponse(page.path, status_code=303, headers=headers)
        return Response(render_page(page), headers=headers, media_type="text/html")

    endpoint.__doc__ = f"Serve the {page.title} page."
    return Route(
        page.path, endpoint, methods=["GET"], name=f"ui.{page.name}", include_in_schema=False
    )


async def _home(request: Request) -> Response:
    """Send a browser to the sessions page (which sends it on to log in if need be)."""
    return RedirectResponse("/ui/sessions", status_code=303)


class UiStaticFiles(StaticFiles):
    """The static files, with the UI's security headers and a cache policy per folder."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        """Serve ``path`` as :class:`StaticFiles` does, adding headers to the answer."""
        response = await super().get_response(path, scope)
        host = Request(scope).headers.get("host")
        response.headers.update(security_headers(host))
        vendor = path.replace("\\", "/").startswith("vendor/")
        response.headers["Cache-Control"] = VENDOR_CACHE if vendor else STATIC_CACHE
        return response


def routes() -> list[BaseRoute]:
    """Return the UI's routes: ``/`` and ``/ui`` to the sessions page, the pages, ``/static``."""
    return [
        Route("/", _home, methods=["GET"], name="ui.home", include_in_schema=False),
        Route("/ui", _home, methods=["GET"], include_in_schema=False),
        Route("/ui/", _home, methods=["GET"], include_in_schema=False),
        *(_page_endpoint(page) for page in PAGES),
        Mount("/static", UiStaticFiles(directory=STATIC_DIR), name="static"),
    ]
