"""schemathesis over ``/api/v1/openapi.json``: no 5xx, and every answer is one the document lists.

One control plane on SQLite is served by uvicorn on 127.0.0.1 for the whole module, with a
simulated agent online, a template, users, a running session and agent tokens, so lists
return real rows and requests with real ids reach real resources. schemathesis reads the
document the server serves and generates requests from it, valid and invalid (positive
and negative modes), with generated path parameters and with real ones. Its checks compare
every response with the document: not a 5xx, a listed status code, the listed content
type, headers and body schema, authentication enforced (it repeats a successful request
without the token), invalid data refused, valid data not refused.

The callers: the bootstrap admin, a user without the admin role, and callers without a
valid token (none, garbage, expired, signed with another key, ``alg: none``, of another
kind, missing claims, of a deleted user, not a bearer credential), who must get 401 with a
``Bearer`` challenge from every operation that needs a token.

schemathesis's own pytest integration is not used (``@schema.parametrize`` reads
``Node._nodeid``, which pytest 9.2 does not have); each test builds a Hypothesis test
from an operation's ``as_strategy`` instead, bounded by :data:`MAX_EXAMPLES`. Operations
run in a fixed order, reads before writes and deletes last, so a delete does not hide a
resource from the reads. The module takes 15-20 s on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import schemathesis
from agentsim import serve_control_plane
from apikit import ADMIN, ADMIN_PASSWORD, SECRET, USER_PASSWORD, bearer, isolate, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode

from streamspace_controlplane.auth import issue_token
from streamspace_controlplane.models import utcnow
from streamspace_controlplane.openapi import build_document
from streamspace_controlplane.routes.api import all_operations
from streamspace_controlplane.store.sqlite import SqliteStore

pytestmark = pytest.mark.filterwarnings(
    # Some of schemathesis's strategies draw from the random module now and then, which
    # Hypothesis warns of (an error under filterwarnings); the cases are still checked.
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

MAX_EXAMPLES = 30
"""Generated requests per operation and caller (operations without inputs need one)."""

START_TIMEOUT_S = 30.0
"""Bound on starting, seeding and stopping the served control plane."""

USER = "fuzz-user"
"""A user without the admin role; owns the running session."""
SPARE = "fuzz-spare"
"""A user with a session of their own, whom the admin may delete."""
GONE = "fuzz-gone"
"""A user deleted after logging in: their token is one of the invalid ones."""
AGENT = "fuzz-agent-1"
"""The simulated agent, online for the whole module."""
TEMPLATE = "desktop"
"""The template every seeded session starts from."""


@dataclass
class World:
    """The served control plane and what was put in it."""

    url: str
    """``http://127.0.0.1:<port>``."""
    tokens: dict[str, str] = field(default_factory=dict)
    """``Authorization`` header values by caller: ``admin``, ``user``."""
    invalid: dict[str, str] = field(default_factory=dict)
    """Bearer tokens that must be refused, by what is wrong with them."""
    ids: dict[str, str] = field(default_factory=dict)
    """A real value for each path parameter of the document."""


def _invalid_tokens(deleted_user_token: str) -> dict[str, str]:
    now = utcnow()
    epoch = int(now.timestamp())
    claims = {"sub": ADMIN, "role": "admin", "kind": "api", "iat": epoch, "exp": epoch + 3600}
    return {
        "expired": issue_token(SECRET, ADMIN, "admin", 60, now=now - timedelta(hours=2))[0],
        "other-key": issue_token("k" * 40, ADMIN, "admin", 3600)[0],
        "alg-none": jwt.encode(claims, key=None, algorithm="none"),
        "other-kind": issue_token(SECRET, ADMIN, "admin", 3600, kind="vnc")[0],
        "no-claims": jwt.encode({"sub": ADMIN}, SECRET, algorithm="HS256"),
        "deleted-user": deleted_user_token,
    }


async def _seed(client: httpx.AsyncClient, world: World) -> None:
    """Fill the control plane through its own API, as people would."""

    def ok(response: httpx.Response, status: int) -> Any:
        assert response.status_code == status, response.text
        return response.json() if response.content else None

    async def login(username: str, password: str) -> str:
        credentials = {"username": username, "password": password}
        return str(ok(await client.post("/api/v1/auth/login", json=credentials), 200)["token"])

    admin = bearer(await login(ADMIN, ADMIN_PASSWORD))
    for username in (USER, SPARE, GONE):
        body = {"username": username, "password": USER_PASSWORD, "role": "user"}
        ok(await client.post("/api/v1/users", json=body, headers=admin), 201)
    user = bearer(await login(USER, USER_PASSWORD))
    gone = await login(GONE, USER_PASSWORD)
    ok(await client.delete(f"/api/v1/users/{GONE}", headers=admin), 204)
    template = {"name": TEMPLATE, "display_name": "Desktop", "image": "example/desktop:1"}
    ok(await client.post("/api/v1/templates", json=template, headers=admin), 201)
    mine = ok(await client.post("/api/v1/sessions", json={"template": TEMPLATE}, headers=user), 201)
    spares = {"template": TEMPLATE, "user": SPARE}
    ok(await client.post("/api/v1/sessions", json=spares, headers=admin), 201)
    token = ok(await client.post(f"/api/v1/agents/{AGENT}/tokens", headers=admin), 201)
    world.tokens = {"admin": admin["Authorization"], "user": user["Authorization"]}
    world.invalid = _invalid_tokens(gone)
    world.ids = {
        "session_id": mine["id"],
        "name": TEMPLATE,
        "username": SPARE,
        "agent_id": AGENT,
        "token_id": token["token_id"],
    }


@contextlib.contextmanager
def _serve(home: Path) -> Iterator[World]:
    """Run the control plane on an event loop of its own thread; yield once it is seeded."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), stop
        store = SqliteStore(home / "home" / "streamspace.db")
        async with serve_control_plane(make_settings(home), store) as harness:
            world = World(url="http" + harness.url.removeprefix("ws"))
            async with httpx.AsyncClient(base_url=world.url, timeout=START_TIMEOUT_S) as client:
                await _seed(client, world)  # the first answer means the app has started
            await harness.agent(AGENT)
            await harness.wait_state(world.ids["session_id"], "running")
            box["world"] = world
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="fuzz-control-plane")
    thread.start()
    try:
        assert ready.wait(START_TIMEOUT_S), "the control plane did not start"
        if "error" in box:
            raise box["error"]
        yield box["world"]
    finally:
        if thread.is_alive() and "stop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(START_TIMEOUT_S)
        assert not thread.is_alive(), "the control plane did not stop"
    if "error" in box:
        raise box["error"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The served, seeded control plane, for the whole module."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(monkeypatch)
        with _serve(tmp_path_factory.mktemp("fuzz")) as served:
            yield served


CONFIG: dict[str, Any] = {
    "generation": {"database": "none", "with-security-parameters": False},
    "checks": {
        # Besides what schemathesis expects for a valid request, a 422 for one that fits
        # the schema but names nothing that exists ("no template 'x'") or breaks a rule a
        # schema cannot state (a body's name against the path's). The document lists it.
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429"]
        },
    },
    "request-timeout": 10,
    "operations": [
        # A live stream never ends: read one event, or what came within a second.
        {
            "include-path": "/api/v1/sessions/{session_id}/events",
            "max-stream-events": 1,
            "request-timeout": 1,
        }
    ],
}
"""schemathesis's settings: no example database, no generated ``Authorization`` header
(each test sends its caller's), bounded waits."""


@pytest.fixture(scope="module")
def api_schema(world: World) -> BaseSchema:
    """The document as the server serves it."""
    return schemathesis.openapi.from_url(
        f"{world.url}/api/v1/openapi.json", config=schemathesis.Config.from_dict(CONFIG)
    )


DOCUMENT = build_document(all_operations())
"""The document ``/api/v1/openapi.json`` serves, to list the operations at collection."""

_ORDER = {"GET": 0, "POST": 1, "PUT": 2, "PATCH": 3, "DELETE": 4}
OPERATIONS = sorted(
    ((method.upper(), path) for path, methods in DOCUMENT["paths"].items() for method in methods),
    key=lambda op: (_ORDER[op[0]], op[1]),
)
"""Every operation of the document: reads, then writes, then deletes."""
OPERATION_IDS = [f"{method} {path}" for method, path in OPERATIONS]
SECURED = {(m, p) for m, p in OPERATIONS if "security" in DOCUMENT["paths"][p][m.lower()]}

FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


REAL_FIELDS = {"template": TEMPLATE, "user": USER}
"""Body fields that name something: a valid body that names what exists goes further."""


def _real_body(case: Case[Any]) -> Case[Any]:
    if isinstance(case.body, dict):
        for name, value in REAL_FIELDS.items():
            if name in case.body:
                case.body[name] = value
    return case


def _cases(
    operation: APIOperation[Any, Any, Any, Any], ids: dict[str, str]
) -> st.SearchStrategy[Case[Any]]:
    """Valid and invalid requests, with generated path parameters and with real ones, and
    valid bodies naming a real template and user."""
    real = {name: ids[name] for name in re.findall(r"{(\w+)}", operation.path)}
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    strategies = [operation.as_strategy(mode) for mode in modes]
    if real:
        strategies += [operation.as_strategy(mode, path_parameters=real) for mode in modes]
    if operation.body:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE).map(_real_body))
    return st.one_of(strategies)


def test_every_operation_is_fuzzed(api_schema: BaseSchema) -> None:
    """The served document has exactly the operations collected here, every check is on."""
    paths = api_schema.raw_schema["paths"]
    assert {(m.upper(), p) for p, methods in paths.items() for m in methods} == set(OPERATIONS)
    checks = api_schema.config.checks_config_for(operation=None, phase=None)
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "ignored_auth",
    ):
        assert checks.get_by_name(name=name).enabled, name


@pytest.mark.parametrize("caller", ["admin", "user"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=OPERATION_IDS)
def test_valid_token(
    api_schema: BaseSchema, world: World, caller: str, method: str, path: str
) -> None:
    """Whatever an admin or a user sends is answered as the document says, never with 5xx."""
    operation = api_schema[path][method]
    headers = {"Authorization": world.tokens[caller]}

    @FUZZ
    @given(case=_cases(operation, world.ids))
    def check(case: Case[Any]) -> None:
        case.call_and_validate(headers=headers)

    check()


INVALID = [
    "none",
    "garbage",
    "not-bearer",
    "expired",
    "other-key",
    "alg-none",
    "other-kind",
    "no-claims",
    "deleted-user",
]
"""What is wrong with the caller's credentials."""

_garbage = st.from_regex(r"[!-~]{1,300}( [!-~]{1,20})?", fullmatch=True)
"""Printable ASCII (what a header can carry), sometimes with a second word."""


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=OPERATION_IDS)
def test_invalid_token(api_schema: BaseSchema, world: World, method: str, path: str) -> None:
    """Without a valid token every operation that needs one answers 401 with a Bearer
    challenge, whatever else the request holds; public operations answer as documented."""
    operation = api_schema[path][method]
    secured = (method, path) in SECURED

    @FUZZ
    @given(case=_cases(operation, world.ids), kind=st.sampled_from(INVALID), noise=_garbage)
    def check(case: Case[Any], kind: str, noise: str) -> None:
        if kind == "none":
            headers = {}
        elif kind == "garbage":
            headers = {"Authorization": f"Bearer {noise}"}
        elif kind == "not-bearer":
            headers = {"Authorization": f"Basic {noise}"}
        else:
            headers = {"Authorization": f"Bearer {world.invalid[kind]}"}
        response = case.call_and_validate(headers=headers)
        if secured:
            assert response.status_code == 401, (kind, response.status_code, response.text)
            challenges = response.headers.get("www-authenticate", [])  # names are lower case
            assert [c.split()[0] for c in challenges] == ["Bearer"], (kind, challenges)

    check()
