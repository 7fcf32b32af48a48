"""Probes and metrics: ``/health``, ``/ready`` and ``/metrics``; no authentication."""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from streamspace_controlplane.http import control_plane, json_response
from streamspace_controlplane.openapi import Operation, build_routes
from streamspace_controlplane.schemas import HealthOut, ReadyOut
from streamspace_controlplane.services import status

__all__ = ["OPERATIONS", "routes"]

logger = logging.getLogger("streamspace.controlplane")


async def health(request: Request) -> Response:
    """Answer 200 while the process runs (the liveness probe)."""
    return json_response(HealthOut())


async def ready(request: Request) -> Response:
    """Answer 200 when the store answers and is migrated, else 503 saying what is wrong."""
    ok, version, problems = await status.readiness(control_plane(request))
    body = ReadyOut(
        status="ready" if ok else "not_ready", schema_version=version, problems=problems
    )
    return json_response(body, 200 if ok else 503)


async def metrics(request: Request) -> Response:
    """Render the Prometheus metrics, refreshing the store-backed gauges first."""
    cp = control_plane(request)
    await status.refresh_gauges(cp)  # on a store failure, still serve the process's own
    return Response(cp.metrics.render(), media_type=CONTENT_TYPE_LATEST)


OPERATIONS = [
    Operation(
        "GET",
        "/health",
        health,
        "Liveness: the process is up",
        auth="public",
        response=HealthOut,
        tag="health",
    ),
    Operation(
        "GET",
        "/ready",
        ready,
        "Readiness: the store answers and is migrated, and the hub works",
        auth="public",
        response=ReadyOut,
        errors=(503,),
        tag="health",
        description="503 with `status: not_ready` and the problems when not ready.",
    ),
    Operation(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        auth="public",
        media_type=CONTENT_TYPE_LATEST.split(";")[0],
        tag="health",
        description="Agents by status, sessions by state, command round trips, WebSockets.",
    ),
]
"""The probe routes, as the OpenAPI document lists them."""


def routes() -> list[BaseRoute]:
    """Return the probe routes."""
    return build_routes(OPERATIONS)
