"""The hook specifications: every point where zero or more plugins may take part.

A hook plugin is a module (or object) with functions marked ``@hookimpl`` whose names and
parameters match the specs below; it registers under the entry-point group ``streamspace``.
An implementation may accept any subset of a spec's parameters, by name, and may be
``async def``: :class:`streamspace_sdk.hooks.Hooks`, the one caller of these hooks, awaits
what they return. Hooks are always called with keyword arguments, so implementations must
declare their parameters as ordinary (not keyword-only) parameters: pluggy passes only
those.

Arguments may be added to a spec in a minor release; existing implementations keep working
because they name only the arguments they take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from streamspace_sdk.hooks import (
        AuditRecord,
        CommandRegistry,
        Principal,
        RouteRegistry,
        SessionEvent,
    )
    from streamspace_sdk.platform import SessionSpec

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "streamspace"
"""The pluggy project name; also the entry-point group hook plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks a function in this module as a hook specification."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a plugin's function as the implementation of the hook of the same name."""


@hookspec
def prepare_session_spec(spec: SessionSpec, agent_id: str) -> SessionSpec | None:
    """Change or refuse a session's spec just before the agent starts or wakes it.

    Called on the agent, once per ``start`` or ``wake`` command, before the platform sees
    the spec. Implementations are chained in call order: each receives the spec returned
    by the one before (the first receives the control plane's spec), and the platform gets
    the last one's.

    Args:
        spec: The spec so far; frozen, so build a changed one with ``spec.model_copy``.
        agent_id: The id of the agent about to run the session.

    Returns:
        A replacement spec, or ``None`` to keep ``spec`` unchanged. The session id and
        generation must stay the same.

    Raises:
        SessionVetoed: To refuse the session; the message is shown to the user, and no
            later implementation is called.

    .. versionadded:: 0.4
    """


@hookspec
def session_event(event: SessionEvent) -> None:
    """Observe one lifecycle transition of a session.

    Called on the agent and on the control plane for every transition (``pending`` →
    ``scheduled`` → ``starting`` → ``running`` …) after it has happened. Every
    implementation is called; an exception is logged and ignored, so an observer can never
    stop a session's lifecycle. Keep it quick: the transition waits for observers.

    Args:
        event: What changed, where and when.

    Returns:
        Nothing; a return value is ignored.

    .. versionadded:: 0.4
    """


@hookspec
def register_commands(registry: CommandRegistry) -> None:
    """Contribute agent commands beyond ``start``, ``stop``, ``hibernate`` and ``wake``.

    Called once on the agent at start-up, before it connects. Add each command with
    ``registry.add(name, handler)``; a handler is an async function that takes the
    command's arguments as a dict and returns its result as a dict. Two plugins adding the
    same name is an error at start-up.

    Args:
        registry: Where commands are added.

    Returns:
        Nothing; a return value is ignored.

    .. versionadded:: 0.4
    """


@hookspec
def register_routes(registry: RouteRegistry) -> None:
    """Contribute HTTP routes to the control plane.

    Called once on the control plane at start-up, before it serves requests. Add each
    route with ``registry.add(path, endpoint, methods=("GET",), name=None)``; the endpoint
    is whatever the control plane's web framework (Starlette) accepts as a route endpoint.
    Two plugins adding the same path and method is an error at start-up.

    Args:
        registry: Where routes are added.

    Returns:
        Nothing; a return value is ignored.

    .. versionadded:: 0.4
    """


@hookspec(firstresult=True)
def authorize(principal: Principal, action: str, resource: str) -> bool | None:
    """Decide whether a principal may perform an action on a resource.

    Called on the control plane whenever a request needs an authorisation decision, before
    the built-in role rules, so a policy plugin can grant or refuse first. Stops at first
    non-None result; when every implementation returns ``None`` the built-in rules decide.
    An exception propagates to the caller and is never taken as a grant.

    Args:
        principal: Who asks: a user, an admin or an agent.
        action: What they want to do, e.g. ``session.create``.
        resource: What it is done to, e.g. ``session/abc123`` or ``template/firefox``.

    Returns:
        ``True`` to allow, ``False`` to deny, or ``None`` to defer to the next
        implementation.

    .. versionadded:: 0.4
    """


@hookspec
def audit_event(record: AuditRecord) -> None:
    """Receive one audit record, e.g. to ship it to a SIEM.

    Called on the control plane after each audited action (log-in, session created or
    deleted, template or user changed, authorisation denied). Every implementation is
    called; an exception is logged and ignored, so a broken sink never fails the action.

    Args:
        record: Who did what to what, and when.

    Returns:
        Nothing; a return value is ignored.

    .. versionadded:: 0.4
    """
