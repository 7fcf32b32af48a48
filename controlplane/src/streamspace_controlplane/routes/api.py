"""REST API v1: auth, users, templates, sessions, agents and agent tokens.

Handlers authenticate and authorise (``http.require_*``), parse (``http.parse_*``), call
one service and serialise its answer; they never touch the store. :data:`OPERATIONS` is
the route table the app mounts and the OpenAPI document describes.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.http import (
    client_address,
    control_plane,
    json_response,
    parse_body,
    parse_query,
    require_admin,
    require_user,
)
from streamspace_controlplane.models import Template
from streamspace_controlplane.openapi import Operation, build_document, build_routes
from streamspace_controlplane.routes import events, health, vnc
from streamspace_controlplane.schemas import (
    AgentOut,
    AgentTokenCreated,
    AgentTokenListQuery,
    AgentTokenOut,
    LoginRequest,
    LoginResponse,
    SessionCreate,
    SessionListQuery,
    SessionOut,
    SessionPage,
    SessionPatch,
    TemplateCreate,
    TemplateUpdate,
    UserCreate,
    UserOut,
    UserPatch,
)
from streamspace_controlplane.services import agents, sessions, templates, users

__all__ = ["OPERATIONS", "all_operations", "routes"]

PREFIX = "/api/v1"


def _no_content() -> Response:
    return Response(status_code=204)


# -- auth and users ----------------------------------------------------------------------


async def login(request: Request) -> Response:
    """Exchange a username and password for a bearer token."""
    body = await parse_body(request, LoginRequest)
    token, expires = await users.login(
        control_plane(request), body.username, body.password, client_address(request)
    )
    return json_response(LoginResponse(token=token, expires_at=expires))


async def list_users(request: Request) -> Response:
    """List users."""
    await require_admin(request, "user.list", "users")
    return json_response([UserOut.of(u) for u in await users.list_users(control_plane(request))])


async def create_user(request: Request) -> Response:
    """Create a user."""
    actor = await require_admin(request, "user.create", "users")
    body = await parse_body(request, UserCreate)
    user = await users.create_user(
        control_plane(request), body.username, body.password, body.role, actor=actor
    )
    return json_response(UserOut.of(user), 201, {"Location": f"{PREFIX}/users/{user.username}"})


async def patch_user(request: Request) -> Response:
    """Disable or enable a user, change their role or set their password."""
    username = request.path_params["username"]
    actor = await require_admin(request, "user.update", f"user/{username}")
    body = await parse_body(request, UserPatch)
    user = await users.update_user(
        control_plane(request),
        actor,
        username,
        disabled=body.disabled,
        role=body.role,
        password=body.password,
    )
    return json_response(UserOut.of(user))


async def delete_user(request: Request) -> Response:
    """Delete a user."""
    username = request.path_params["username"]
    actor = await require_admin(request, "user.delete", f"user/{username}")
    await users.delete_user(control_plane(request), actor, username)
    return _no_content()


# -- templates ---------------------------------------------------------------------------


async def list_templates(request: Request) -> Response:
    """List templates."""
    await require_user(request, "template.list", "templates")
    found = await templates.list_templates(control_plane(request))
    return json_response(found)


async def get_template(request: Request) -> Response:
    """Read one template."""
    name = request.path_params["name"]
    await require_user(request, "template.read", f"template/{name}")
    return json_response(await templates.get_template(control_plane(request), name))


async def create_template(request: Request) -> Response:
    """Create a template."""
    actor = await require_admin(request, "template.create", "templates")
    body = await parse_body(request, TemplateCreate)
    created = await templates.create_template(control_plane(request), actor, body.name, body)
    return json_response(created, 201, {"Location": f"{PREFIX}/templates/{created.name}"})


async def update_template(request: Request) -> Response:
    """Replace a template."""
    name = request.path_params["name"]
    actor = await require_admin(request, "template.update", f"template/{name}")
    body = await parse_body(request, TemplateUpdate)
    if body.name is not None and body.name != name:
        raise ApiError(
            422,
            "validation_error",
            f"body.name {body.name!r} differs from the template in the path ({name!r}); "
            "templates cannot be renamed",
            fields=[{"field": "body.name", "message": "must equal the name in the path"}],
        )
    return json_response(await templates.update_template(control_plane(request), actor, name, body))


async def delete_template(request: Request) -> Response:
    """Delete a template."""
    name = request.path_params["name"]
    actor = await require_admin(request, "template.delete", f"template/{name}")
    await templates.delete_template(control_plane(request), actor, name)
    return _no_content()


# -- sessions ----------------------------------------------------------------------------


async def create_session(request: Request) -> Response:
    """Start a session."""
    actor = await require_user(request, "session.create", "sessions")
    body = await parse_body(request, SessionCreate)
    session = await sessions.create_session(
        control_plane(request),
        actor,
        body.template,
        user=body.user,
        region=body.region,
        labels=body.labels,
    )
    return json_response(
        SessionOut.of(session), 201, {"Location": f"{PREFIX}/sessions/{session.id}"}
    )


async def list_sessions(request: Request) -> Response:
    """List sessions: one's own, or every one for admins."""
    actor = await require_user(request, "session.list", "sessions")
    query = parse_query(request, SessionListQuery)
    page, total = await sessions.list_sessions(
        control_plane(request),
        actor,
        state=query.state,
        user=query.user,
        limit=query.limit,
        offset=query.offset,
    )
    return json_response(
        SessionPage(
            items=[SessionOut.of(s) for s in page],
            total=total,
            limit=query.limit,
            offset=query.offset,
        )
    )


async def get_session(request: Request) -> Response:
    """Read one session."""
    session_id = request.path_params["session_id"]
    actor = await require_user(request, "session.read", f"session/{session_id}")
    session = await sessions.get_session(control_plane(request), actor, session_id)
    return json_response(SessionOut.of(session))


async def patch_session(request: Request) -> Response:
    """Ask for a session to be running, hibernated or stopped."""
    session_id = request.path_params["session_id"]
    actor = await require_user(request, "session.update", f"session/{session_id}")
    body = await parse_body(request, SessionPatch)
    session = await sessions.set_desired_state(
        control_plane(request), actor, session_id, body.state
    )
    return json_response(SessionOut.of(session))


async def delete_session(request: Request) -> Response:
    """Stop a session and forget it."""
    session_id = request.path_params["session_id"]
    actor = await require_user(request, "session.delete", f"session/{session_id}")
    stopping = await sessions.delete_session(control_plane(request), actor, session_id)
    if stopping is None:
        return _no_content()
    return json_response(SessionOut.of(stopping), 202)


# -- agents and agent tokens -------------------------------------------------------------


async def list_agents(request: Request) -> Response:
    """List agents."""
    await require_admin(request, "agent.list", "agents")
    found = await agents.list_agents(control_plane(request))
    return json_response([AgentOut.of(a) for a in found])


async def get_agent(request: Request) -> Response:
    """Read one agent."""
    agent_id = request.path_params["agent_id"]
    await require_admin(request, "agent.read", f"agent/{agent_id}")
    return json_response(AgentOut.of(await agents.get_agent(control_plane(request), agent_id)))


async def delete_agent(request: Request) -> Response:
    """Delete an agent: revoke its tokens, disconnect it and forget it."""
    agent_id = request.path_params["agent_id"]
    actor = await require_admin(request, "agent.delete", f"agent/{agent_id}")
    await agents.delete_agent(control_plane(request), actor, agent_id)
    return _no_content()


async def create_agent_token(request: Request) -> Response:
    """Issue a token for an agent; the token is in this answer only."""
    agent_id = request.path_params["agent_id"]
    actor = await require_admin(request, "agent_token.create", f"agent/{agent_id}")
    token, record = await agents.create_token(control_plane(request), agent_id, actor=actor)
    out = AgentTokenCreated(**AgentTokenOut.of(record).model_dump(), token=token)
    return json_response(out, 201, {"Cache-Control": "no-store"})


async def list_agent_tokens(request: Request) -> Response:
    """List agent tokens, without the tokens."""
    await require_admin(request, "agent_token.list", "agent-tokens")
    query = parse_query(request, AgentTokenListQuery)
    found = await agents.list_tokens(control_plane(request), query.agent_id)
    return json_response([AgentTokenOut.of(t) for t in found])


async def revoke_agent_token(request: Request) -> Response:
    """Revoke an agent token."""
    token_id = request.path_params["token_id"]
    actor = await require_admin(request, "agent_token.revoke", f"agent-token/{token_id}")
    await agents.revoke_token(control_plane(request), actor, token_id)
    return _no_content()


# -- the document ------------------------------------------------------------------------

_document: dict[str, Any] | None = None


async def openapi_json(request: Request) -> Response:
    """Serve the OpenAPI 3.1 document of every route above."""
    global _document
    if _document is None:
        _document = build_document(all_operations())
    return JSONResponse(_document)


S = f"{PREFIX}/sessions/{{session_id}}"

OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        f"{PREFIX}/openapi.json",
        openapi_json,
        "This OpenAPI document",
        auth="public",
        tag="meta",
    ),
    Operation(
        "POST",
        f"{PREFIX}/auth/login",
        login,
        "Log in for a bearer token",
        auth="public",
        request=LoginRequest,
        response=LoginResponse,
        errors=(401, 403, 429),
        tag="auth",
        description="Failed logins per user and address are throttled: 429 with Retry-After. "
        "The right password of a disabled user: 403 `user_disabled`.",
    ),
    # users
    Operation(
        "GET",
        f"{PREFIX}/users",
        list_users,
        "List users",
        auth="admin",
        response=UserOut,
        response_list=True,
        tag="users",
    ),
    Operation(
        "POST",
        f"{PREFIX}/users",
        create_user,
        "Create a user",
        auth="admin",
        request=UserCreate,
        response=UserOut,
        status=201,
        errors=(409,),
        tag="users",
    ),
    Operation(
        "PATCH",
        f"{PREFIX}/users/{{username}}",
        patch_user,
        "Disable or enable a user, change their role or password",
        auth="admin",
        request=UserPatch,
        response=UserOut,
        errors=(409,),
        tag="users",
        description="Disabling refuses the user's logins and tokens (403 `user_disabled`) "
        "and closes their VNC viewers on every replica (close code 4403); their sessions "
        "keep running. Admins cannot disable or demote themselves, nor the last enabled "
        "admin: 409. Disabling and a new password refuse every token issued before (401 "
        "once enabled again): the user logs in anew.",
    ),
    Operation(
        "DELETE",
        f"{PREFIX}/users/{{username}}",
        delete_user,
        "Delete a user",
        auth="admin",
        status=204,
        errors=(409,),
        tag="users",
    ),
    # templates
    Operation(
        "GET",
        f"{PREFIX}/templates",
        list_templates,
        "List templates",
        response=Template,
        response_list=True,
        tag="templates",
    ),
    Operation(
        "POST",
        f"{PREFIX}/templates",
        create_template,
        "Create a template",
        auth="admin",
        request=TemplateCreate,
        response=Template,
        status=201,
        errors=(409,),
        tag="templates",
    ),
    Operation(
        "GET",
        f"{PREFIX}/templates/{{name}}",
        get_template,
        "Read a template",
        response=Template,
        tag="templates",
    ),
    Operation(
        "PUT",
        f"{PREFIX}/templates/{{name}}",
        update_template,
        "Replace a template",
        auth="admin",
        request=TemplateUpdate,
        response=Template,
        tag="templates",
    ),
    Operation(
        "DELETE",
        f"{PREFIX}/templates/{{name}}",
        delete_template,
        "Delete a template",
        auth="admin",
        status=204,
        errors=(409,),
        tag="templates",
    ),
    # sessions
    Operation(
        "POST",
        f"{PREFIX}/sessions",
        create_session,
        "Start a session",
        request=SessionCreate,
        response=SessionOut,
        status=201,
        errors=(429,),
        tag="sessions",
        description="The owner is the caller; an admin may name another `user`. "
        "Over MAX_SESSIONS_PER_USER sessions that are not stopped: 429. Over "
        "MAX_CONCURRENT_STARTS sessions being started: 429 with Retry-After.",
    ),
    Operation(
        "GET",
        f"{PREFIX}/sessions",
        list_sessions,
        "List sessions",
        query=SessionListQuery,
        response=SessionPage,
        tag="sessions",
        description="A user sees their own sessions; an admin sees all.",
    ),
    Operation("GET", S, get_session, "Read a session", response=SessionOut, tag="sessions"),
    Operation(
        "PATCH",
        S,
        patch_session,
        "Change the state a session should be in",
        request=SessionPatch,
        response=SessionOut,
        errors=(409,),
        tag="sessions",
    ),
    Operation(
        "DELETE",
        S,
        delete_session,
        "Stop a session and forget it",
        response=SessionOut,
        status=202,
        errors=(409,),
        tag="sessions",
        other_statuses={204: "Deleted at once (it never ran, or has stopped)."},
        description="202 with the session while it stops; the record goes once it has stopped.",
    ),
    *events.OPERATIONS,
    *vnc.OPERATIONS,
    # agents
    Operation(
        "GET",
        f"{PREFIX}/agents",
        list_agents,
        "List agents",
        auth="admin",
        response=AgentOut,
        response_list=True,
        tag="agents",
    ),
    Operation(
        "GET",
        f"{PREFIX}/agents/{{agent_id}}",
        get_agent,
        "Read an agent",
        auth="admin",
        response=AgentOut,
        tag="agents",
    ),
    Operation(
        "DELETE",
        f"{PREFIX}/agents/{{agent_id}}",
        delete_agent,
        "Delete an agent, online or not",
        auth="admin",
        status=204,
        tag="agents",
        description="Revokes every token of the agent, so it cannot come back with one; "
        "closes its socket and its VNC viewers on every replica (close code 4403); marks "
        "the sessions placed on it `failed` and no longer placed (their compute may still "
        "run on its platform: stop it there), so each can be deleted, or started again on "
        "another agent; then forgets the agent. Issue a new token to bring it back.",
    ),
    Operation(
        "POST",
        f"{PREFIX}/agents/{{agent_id}}/tokens",
        create_agent_token,
        "Issue an agent token (shown once)",
        auth="admin",
        response=AgentTokenCreated,
        status=201,
        errors=(422,),
        tag="agents",
    ),
    Operation(
        "GET",
        f"{PREFIX}/agent-tokens",
        list_agent_tokens,
        "List agent tokens",
        auth="admin",
        query=AgentTokenListQuery,
        response=AgentTokenOut,
        response_list=True,
        tag="agents",
    ),
    Operation(
        "DELETE",
        f"{PREFIX}/agent-tokens/{{token_id}}",
        revoke_agent_token,
        "Revoke an agent token",
        auth="admin",
        status=204,
        tag="agents",
    ),
]
"""The REST API v1 routes, with the session event stream."""


def all_operations() -> list[Operation]:
    """Return every documented HTTP operation: probes, then the API."""
    return [*health.OPERATIONS, *OPERATIONS]


def routes() -> list[BaseRoute]:
    """Return the API's routes (the probes are mounted by ``routes.health``)."""
    return build_routes(OPERATIONS)
