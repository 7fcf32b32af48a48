"""What the process reports about itself: readiness and the gauges of ``/metrics``."""

from __future__ import annotations

import logging
from collections import Counter
from typing import get_args

from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import AgentStatus
from streamspace_controlplane.store.base import Store, StoreError
from streamspace_sdk.platform import SessionState

__all__ = ["latest_schema_version", "readiness", "refresh_gauges"]

logger = logging.getLogger("streamspace.controlplane")


def latest_schema_version(store: Store) -> int | None:
    """Return the newest migration the store's driver ships, or ``None`` if it cannot say.

    Uses the driver's ``latest_schema_version()`` when it has one; the SQL drivers are
    asked for their migration files otherwise.
    """
    latest = getattr(store, "latest_schema_version", None)
    if callable(latest):
        value = latest()
        return value if isinstance(value, int) else None
    from streamspace_controlplane.store._sql import SqlStore, load_migrations

    if isinstance(store, SqlStore):
        return max((m.version for m in load_migrations(store.dialect.name)), default=0)
    return None


async def readiness(cp: ControlPlane) -> tuple[bool, int | None, list[str]]:
    """Check that the store answers, its schema is up to date, and the hub works.

    Returns:
        Whether the process is ready, the applied schema version (``None`` if unknown),
        and what is wrong.
    """
    problems: list[str] = []
    try:
        await cp.store.ping()
        version: int | None = await cp.store.schema_version()
    except (StoreError, OSError) as exc:
        logger.warning("Not ready: store unreachable: %s", exc)
        return False, None, [f"store unreachable: {exc}"]
    problems.extend(await cp.hub.problems())
    latest = latest_schema_version(cp.store)
    if latest is not None and (version or 0) < latest:
        problems.append(
            f"store schema is at version {version}, migrations go up to {latest}; "
            "run `streamspace-controlplane migrate`"
        )
    elif latest is None and not version:
        problems.append("store schema is not migrated; run `streamspace-controlplane migrate`")
    return not problems, version, problems


async def refresh_gauges(cp: ControlPlane) -> bool:
    """Set the agents-by-status and sessions-by-state gauges from the store.

    Every status and state gets a value (zero included), so dashboards see the series
    before anything happens.

    Returns:
        False when the store could not be read (the gauges keep their last values and the
        process's own metrics are still served).
    """
    try:
        by_status = Counter(agent.status for agent in await cp.store.list_agents())
        counts = {
            state: await cp.store.count_sessions(states=[state]) for state in get_args(SessionState)
        }
    except StoreError as exc:
        logger.warning("Metrics: could not read the store: %s", exc)
        return False
    for status in get_args(AgentStatus):
        cp.metrics.agents.labels(status=status).set(by_status.get(status, 0))
    for state, count in counts.items():
        cp.metrics.sessions.labels(state=state).set(count)
    return True
