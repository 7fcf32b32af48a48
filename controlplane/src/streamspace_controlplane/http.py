"""HTTP plumbing of the REST API: errors, bodies, authentication and authorisation.

Every error leaves the API as ``{"error": {"code": ..., "message": ...}}`` with a fitting
status, including Starlette's own 404 and 405, validation errors (422, with the path of
each bad field) and unexpected failures (500, with nothing internal in it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from streamspace_controlplane import auth
from streamspace_controlplane._errors import ERROR_CODES, ApiError, validation_error
from streamspace_controlplane.audit import audit
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.store.base import Conflict, NotFound, StoreError
from streamspace_sdk.hooks import Principal

__all__ = [
    "MAX_BODY_BYTES",
    "ApiError",
    "authorize",
    "client_address",
    "control_plane",
    "deny_websocket",
    "error_response",
    "exception_handlers",
    "json_response",
    "parse_body",
    "parse_query",
    "require_admin",
    "require_user",
    "validation_error",
]

logger = logging.getLogger("streamspace.controlplane.http")

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 1 << 20
"""Largest request body read (1 MiB); API bodies are small, so more is a mistake or abuse."""


def control_plane(request: Request) -> ControlPlane:
    """Return the control plane the app was built with."""
    return cast(ControlPlane, request.app.state.cp)


def client_address(request: Request) -> str:
    """Return the client's address, as the server (and its proxy settings) saw it."""
    return request.client.host if request.client else "unknown"


# -- responses ---------------------------------------------------------------------------


def json_response(
    content: BaseModel | Sequence[BaseModel],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Serialise a model, or a list of models, as a JSON response."""
    if isinstance(content, BaseModel):
        body = content.model_dump_json().encode()
    else:
        body = b"[" + b",".join(item.model_dump_json().encode() for item in content) + b"]"
    return Response(body, status, headers=dict(headers or {}), media_type="application/json")


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    fields: list[dict[str, str]] | None = None,
) -> Response:
    """Return ``{"error": {"code", "message"[, "fields"]}}`` with ``status``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        error["fields"] = fields
    return Response(
        json.dumps({"error": error}),
        status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


async def deny_websocket(
    websocket: WebSocket, exc: ApiError, close_code: int, reason: str = ""
) -> None:
    """Refuse a WebSocket before accepting it: ``exc`` as an HTTP error response where the
    server supports denial responses, else a close with ``close_code`` (HTTP 403)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(
            error_response(exc.status, exc.code, exc.message, exc.headers)
        )
    else:
        await websocket.close(close_code, reason)


# -- requests ----------------------------------------------------------------------------


def _declares_too_much(declared: str | None) -> bool:
    """Whether a ``Content-Length`` states more than :data:`MAX_BODY_BYTES`.

    Only ASCII digits count (``str.isdigit`` also holds for ``"²"``, which ``int`` refuses),
    and a long number is too large before ``int`` would refuse its 4,300th digit; any other
    value is left to the body's actual size.
    """
    if not declared or not (declared.isascii() and declared.isdigit()):
        return False
    digits = declared.lstrip("0")
    return len(digits) > len(str(MAX_BODY_BYTES)) or int(digits or "0") > MAX_BODY_BYTES


async def _read_body(request: Request) -> bytes:
    if _declares_too_much(request.headers.get("content-length")):
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client went away while sending the body") from None
    return b"".join(chunks)


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")


async def parse_body(request: Request, model: type[M]) -> M:
    """Read the request's JSON body into ``model``.

    Validation is strict: a body is JSON, so a value of another JSON type than the
    document says (``false`` or ``"5"`` for an integer) is refused, not converted.

    Raises:
        ApiError: 400 when the body is empty or not JSON, 413 when it is too large, 422
            when it does not fit ``model`` (each bad field named).
    """
    raw = await _read_body(request)
    if not raw.strip():
        raise ApiError(400, "bad_request", "request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "bad_request", f"request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise validation_error(exc, "body") from None


def parse_query(request: Request, model: type[M]) -> M:
    """Validate the query string against ``model`` (a repeated parameter is refused).

    Raises:
        ApiError: 422 naming each bad parameter.
    """
    params: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key in params:
            raise ApiError(
                422,
                "validation_error",
                f"invalid request: query.{key}: given more than once",
                fields=[{"field": f"query.{key}", "message": "given more than once"}],
            )
        params[key] = value
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise validation_error(exc, "query") from None


# -- authentication and authorisation ----------------------------------------------------


async def authorize(
    cp: ControlPlane, principal: Principal, action: str, resource: str, *, admin_only: bool
) -> None:
    """Decide whether ``principal`` may do ``action`` on ``resource``.

    ``authorize`` hook plugins decide first: ``True`` allows, ``False`` denies, and an
    exception denies too (a broken policy must never grant). When every plugin defers, the
    built-in rule is that admin-only actions need the ``admin`` role and every other action
    is open to any logged-in user (services then limit users to what they own).

    Raises:
        ApiError: 403 ``forbidden``; the refusal is audited.
    """
    try:
        decision = await cp.hooks.authorize(principal, action, resource)
    except Exception:
        logger.exception("authorize hook failed for %s %s; denying", action, resource)
        decision = False
    if decision is None:
        decision = principal.role == "admin" or not admin_only
    if not decision:
        await audit(
            cp,
            principal.username,
            "auth.denied",
            resource,
            {"action": action, "role": principal.role},
        )
        message = "this needs the admin role" if admin_only and principal.role != "admin" else None
        raise ApiError(403, "forbidden", message or f"not allowed to {action} {resource}".strip())


async def _authenticate(request: Request) -> Principal:
    cached = request.scope.get("streamspace.principal")
    if isinstance(cached, Principal):
        return cached
    token = auth.parse_bearer(request.headers.get("authorization"))
    principal = await auth.authenticate_user(control_plane(request), token)
    request.scope["streamspace.principal"] = principal
    return principal


def _describe(request: Request, action: str | None, resource: str | None) -> tuple[str, str]:
    # Routes name their action (``session.create``) and resource (``session/s-...``); a
    # plugin route that does not gets the method and the path, which still say what it is.
    return action or f"http.{request.method.lower()}", resource or request.url.path


async def require_user(
    request: Request, action: str | None = None, resource: str | None = None
) -> Principal:
    """Return the logged-in caller, if they may do ``action`` on ``resource``.

    Args:
        request: The request, carrying ``Authorization: Bearer <token>``.
        action: What is asked, e.g. ``session.create``, as ``authorize`` hooks see it;
            ``http.<method>`` by default.
        resource: What it is done to, e.g. ``session/s-0123456789abcdef``; the path by
            default.

    Raises:
        ApiError: 401 (with ``WWW-Authenticate: Bearer``) without a valid token of an
            existing user; 403 when a policy plugin refuses.
    """
    principal = await _authenticate(request)
    action, resource = _describe(request, action, resource)
    await authorize(control_plane(request), principal, action, resource, admin_only=False)
    return principal


async def require_admin(
    request: Request, action: str | None = None, resource: str | None = None
) -> Principal:
    """Like :func:`require_user`, for actions only admins may do (unless a plugin allows).

    Raises:
        ApiError: 401 as for :func:`require_user`; 403 for a user without the admin role.
    """
    principal = await _authenticate(request)
    action, resource = _describe(request, action, resource)
    await authorize(control_plane(request), principal, action, resource, admin_only=True)
    return principal


# -- exception handlers ------------------------------------------------------------------


def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers, exc.fields)


def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no such resource: {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(status, ERROR_CODES.get(status, "error"), message, exc.headers)


def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    return _api_error(_request, validation_error(exc, ""))


def _store_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, Conflict):
        return error_response(409, "conflict", str(exc))
    if isinstance(exc, NotFound):
        return error_response(404, "not_found", str(exc))
    logger.error("store failed on %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "unavailable", "the store is unavailable; try again later")


def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this, so the server logs the traceback.
    return error_response(500, "internal_error", "internal server error")


Handler = Callable[[Request, Exception], Response | Awaitable[Response]]


def exception_handlers() -> dict[Any, Handler]:
    """Return the app's handlers: every error becomes the JSON error shape."""
    return {
        ApiError: _api_error,
        HTTPException: _http_exception,
        ValidationError: _validation_error,
        StoreError: _store_error,
        500: _internal_error,
    }
