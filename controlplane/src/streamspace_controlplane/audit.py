"""The audit trail: every mutation and every refusal, stored and handed to audit hooks.

Below the services and the request helpers alike, since both record what they refuse or do.
"""

from __future__ import annotations

import logging

from pydantic import JsonValue

from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import AuditEntry, utcnow
from streamspace_sdk.hooks import AuditRecord

__all__ = ["audit"]

logger = logging.getLogger("streamspace.controlplane.audit")


async def audit(
    cp: ControlPlane,
    actor: str,
    action: str,
    resource: str,
    detail: dict[str, JsonValue] | None = None,
) -> AuditEntry:
    """Store one audit entry and hand it to every ``audit_event`` hook.

    Args:
        cp: The control plane.
        actor: Username, ``agent:<id>``, ``system``, or ``anonymous`` (a failed login).
        action: Verb such as ``session.create`` or ``auth.login_failed``.
        resource: What was acted on, such as ``session/s-0123456789abcdef``.
        detail: Extra facts; never secrets.

    Returns:
        The stored entry.
    """
    entry = await cp.store.add_audit(
        AuditEntry(actor=actor, action=action, resource=resource, detail=detail or {}, at=utcnow())
    )
    logger.debug("audit %s %s %s %s", actor, action, resource, entry.detail)
    await cp.hooks.audit_event(
        AuditRecord(
            actor=actor, action=action, resource=resource, detail=dict(entry.detail), at=entry.at
        )
    )
    return entry
