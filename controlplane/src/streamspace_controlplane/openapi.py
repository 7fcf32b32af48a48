"""The API's route table, and the OpenAPI 3.1 document generated from it.

Each route module lists its :class:`Operation` s: method, path, handler, summary, who may
call it, and the pydantic models of its query, body and response. The same table builds
the Starlette routes (:func:`build_routes`) and the document (:func:`build_document`), so
the document cannot forget a route or describe a body the handler does not read.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from streamspace_controlplane.schemas import ErrorBody

__all__ = ["Auth", "Endpoint", "Operation", "api_version", "build_document", "build_routes"]

Endpoint = Callable[[Request], Awaitable[Response]]
Auth = Literal["public", "user", "admin"]

_PATH_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?}")
_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Malformed request (e.g. a body that is not JSON).",
    401: "No valid bearer token.",
    403: "The caller may not do this.",
    404: "No such resource (or it belongs to another user).",
    409: "Conflicts with the resource's current state.",
    413: "Request body too large.",
    422: "A field of the query or body is invalid.",
    429: "Too many requests or over a quota.",
    503: "Not ready or the store is unavailable.",
}


@dataclass(frozen=True)
class Operation:
    """One method on one path of the API."""

    method: str
    """HTTP method, upper case."""
    path: str
    """Starlette path, e.g. ``/api/v1/sessions/{session_id}``."""
    endpoint: Endpoint
    """The handler; it authenticates, parses and answers by itself."""
    summary: str
    """One line for the document."""
    auth: Auth = "user"
    """Who may call it: anyone, any logged-in user, or admins."""
    request: type[BaseModel] | None = None
    """Model of the JSON body it reads."""
    query: type[BaseModel] | None = None
    """Model of the query parameters it reads."""
    response: type[BaseModel] | None = None
    """Model of the JSON body it answers with (``None``: no body or not JSON)."""
    response_list: bool = False
    """The answer is a JSON array of ``response``."""
    status: int = 200
    """Status of a successful answer."""
    other_statuses: dict[int, str] = field(default_factory=dict)
    """More successful statuses and what they mean (e.g. 202 as well as 204)."""
    media_type: str = "application/json"
    """Content type of a successful answer that is not described by ``response``."""
    errors: tuple[int, ...] = ()
    """Error statuses besides the ones implied by auth, params and body."""
    tag: str = "api"
    """Group in the document."""
    description: str = ""
    """Longer text for the document."""
    headers: tuple[tuple[str, str], ...] = ()
    """Request headers it reads, with a description each (e.g. ``Last-Event-ID``)."""

    @property
    def operation_id(self) -> str:
        """Stable id for generated clients: the handler's name."""
        return self.endpoint.__name__.lstrip("_")


def _dispatch(by_method: dict[str, Endpoint]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await by_method[method](request)

    return endpoint


def build_routes(operations: Iterable[Operation]) -> list[BaseRoute]:
    """Return one Starlette route per path, dispatching on the method.

    One route per path (rather than per operation) makes a wrong method answer 405 with an
    ``Allow`` header listing every method of the path.

    Raises:
        ValueError: Two operations share a method and path.
    """
    paths: dict[str, dict[str, Endpoint]] = {}
    for op in operations:
        methods = paths.setdefault(op.path, {})
        if op.method in methods:
            raise ValueError(f"route {op.method} {op.path} is defined twice")
        methods[op.method] = op.endpoint
    return [
        Route(path, _dispatch(methods), methods=list(methods)) for path, methods in paths.items()
    ]


def api_version() -> str:
    """Return the control plane's package version (the document's ``info.version``)."""
    try:
        return version("streamspace-controlplane")
    except PackageNotFoundError:  # running from a source tree without metadata
        return "0.0.0+unknown"


def _schemas(operations: Sequence[Operation]) -> tuple[dict[Any, Any], dict[str, Any]]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (ErrorBody, "serialization"): None
    }
    for op in operations:
        if op.request is not None:
            wanted[(op.request, "validation")] = None
        if op.query is not None:
            wanted[(op.query, "validation")] = None
        if op.response is not None:
            wanted[(op.response, "serialization")] = None
    refs, top = models_json_schema(list(wanted), ref_template=_REF)
    return dict(refs), dict(top.get("$defs", {}))


def _parameters(
    op: Operation, refs: dict[Any, Any], components: dict[str, Any]
) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(op.path)
    ]
    if op.query is not None:
        ref = refs[(op.query, "validation")]["$ref"]
        schema = components[ref.rsplit("/", 1)[-1]]
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            prop = dict(prop)
            description = prop.pop("description", None)
            param: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": prop,
            }
            if description:
                param["description"] = description
            params.append(param)
    for name, description in op.headers:
        params.append(
            {
                "name": name,
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": description,
            }
        )
    return params


def _error_statuses(op: Operation) -> list[int]:
    statuses = set(op.errors)
    if op.auth != "public":
        statuses |= {401, 403}
    if _PATH_PARAM.search(op.path):
        statuses.add(404)
    if op.query is not None:
        statuses.add(422)
    if op.request is not None:
        statuses |= {400, 413, 422}
    return sorted(statuses)


_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "One event of the stream, as an EventSource delivers it.",
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "data": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
"""What ``schema`` describes for ``text/event-stream`` in OpenAPI 3.1: each event, not the
whole stream (3.2 names it ``itemSchema``)."""


def _untyped_schema(media_type: str) -> dict[str, Any]:
    """The schema of a successful body no model describes."""
    if media_type == "text/event-stream":
        return _SSE_EVENT
    if media_type == "application/json":  # this document itself: an object, not a string
        return {"type": "object"}
    return {"type": "string"}


def _operation(op: Operation, refs: dict[Any, Any], components: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        doc["description"] = op.description
    params = _parameters(op, refs, components)
    if params:
        doc["parameters"] = params
    if op.request is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(op.request, "validation")]}},
        }
    success: dict[str, Any] = {"description": op.summary}
    if op.response is not None:
        schema = refs[(op.response, "serialization")]
        if op.response_list:
            schema = {"type": "array", "items": schema}
        success["content"] = {"application/json": {"schema": schema}}
    elif op.status != 204:
        success["content"] = {op.media_type: {"schema": _untyped_schema(op.media_type)}}
    responses: dict[str, Any] = {str(op.status): success}
    for status, meaning in op.other_statuses.items():
        responses[str(status)] = {"description": meaning}
    error = {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}
    for status in _error_statuses(op):
        responses[str(status)] = {
            "description": _ERROR_TEXT.get(status, "Error."),
            "content": error,
        }
    doc["responses"] = responses
    if op.auth != "public":
        doc["security"] = [{"bearer": []}]
    return doc


def build_document(
    operations: Sequence[Operation], *, title: str = "StreamSpace control plane"
) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of ``operations``.

    Component schemas are the pydantic models' JSON Schemas (draft 2020-12, which OpenAPI
    3.1 uses as is); request models in validation mode, responses in serialisation mode.
    """
    refs, components = _schemas(operations)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        path = _PATH_PARAM.sub(r"{\1}", op.path)
        paths.setdefault(path, {})[op.method.lower()] = _operation(op, refs, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": api_version(),
            "description": (
                "REST API v1 of the StreamSpace control plane. Errors are "
                '`{"error": {"code", "message"}}`. Log in with `POST /api/v1/auth/login` and '
                "send the token as `Authorization: Bearer <token>`. Agents connect over the "
                "WebSocket `GET /api/v1/agents/connect` (also `/agent/ws` and "
                "`/api/v1/agents/hub`; not described here)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
