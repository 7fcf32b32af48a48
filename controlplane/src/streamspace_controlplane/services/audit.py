"""The audit trail, for services: :func:`streamspace_controlplane.audit.audit`."""

from __future__ import annotations

from streamspace_controlplane.audit import audit

__all__ = ["audit"]
