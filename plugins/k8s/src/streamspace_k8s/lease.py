"""The ``kubernetes`` lease: a coordination.k8s.io/v1 Lease, as client-go's leader election.

The Lease ``LEASE_LOCK_NAME`` in ``LEASE_LOCK_NAMESPACE`` holds the record with client-go's
field meanings: ``holderIdentity`` (empty after a release), ``leaseDurationSeconds``,
``acquireTime`` (when the current holder took it), ``renewTime`` (its last renewal; the lease
lapses at ``renewTime + leaseDurationSeconds``) and ``leaseTransitions`` (grows by one at each
change of holder: our fencing epoch).

Every write is a create or a full replace that carries the ``resourceVersion`` it read, so
the API server (etcd underneath) decides each step: of two contenders that read the same
version one write wins, the other gets 409 Conflict and knows someone else won.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from pydantic import Field

from streamspace_k8s._client import ApiError, ClusterSettings, KubeClient, Unreachable
from streamspace_sdk.clock import Clock
from streamspace_sdk.errors import LeaseError, LeaseLost
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.settings import StreamSpaceSettings, driver_settings

__all__ = ["KubernetesLease", "format_micro_time", "parse_time"]

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 5
"""Reads and writes tried when a write loses a race it may still win (a release that raced
a renew); a lost acquire is decided by the record read after the conflict."""
_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
_NAMESPACE = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_EPOCH_SEED_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)


class KubernetesLease(Lease):
    """A leader lease in a coordination.k8s.io/v1 Lease object.

    Expiry is computed from the injected clock (capability ``clock``), as client-go does from
    the local clock: replicas need synchronised clocks (NTP), which every cluster has.

    ``leaseDurationSeconds`` is a whole number of seconds; a fractional duration is rounded
    up, so other replicas never think the lease lapses sooner than its holder does.

    When the Lease does not exist (first use, or deleted by hand) it is created with
    ``leaseTransitions`` set to the seconds since 2020-01-01, because the control plane refuses
    an epoch lower than the highest it saw for the agent: counting from 1 again would lock
    the agent out. That stays below 2**31 (the field is an int32) until the 2080s.
    """

    name: ClassVar[str] = "kubernetes"
    capabilities: ClassVar[frozenset[str]] = frozenset({"exclusive", "clock"})

    class Settings(ClusterSettings):
        """Settings of the kubernetes lease, with the seed guide's names."""

        lease_lock_name: str = Field(default="k8s-agent-leader", pattern=_NAME)
        """Name of the Lease object; one per HA agent."""

        lease_lock_namespace: str = Field(default="streamspace", pattern=_NAMESPACE)
        """Namespace of the Lease object."""

    def __init__(
        self, settings: StreamSpaceSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        settings = driver_settings(KubernetesLease.Settings, settings, "KubernetesLease")
        super().__init__(settings, clock=clock)
        self.config: KubernetesLease.Settings = settings
        self.client = KubeClient(settings)

    @property
    def where(self) -> str:
        return f"Lease {self.config.lease_lock_namespace}/{self.config.lease_lock_name}"

    # -- driver methods --------------------------------------------------------------------

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        for _ in range(_CAS_ATTEMPTS):
            found = await self._get()
            now = self.clock.now()
            old = _record(found) if found is not None else None
            if old is not None and old.is_held(now) and old.holder != holder:
                return None
            same = old is not None and old.holder == holder
            if old is None:
                epoch = max(1, int((now - _EPOCH_SEED_BEFORE).total_seconds()))
            else:
                epoch = old.epoch if same else old.epoch + 1
            acquired = old.acquired_at if old is not None and same else now
            try:
                record = await self._write(found, holder, epoch, acquired, now, duration_s)
            except _Conflict:
                continue  # someone wrote between our read and our write: look again
            if not same:
                log.info("%s acquired by %s (epoch %d)", self.where, holder, epoch)
            return record
        return None

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        for _ in range(_CAS_ATTEMPTS):
            found = await self._get()
            old = _record(found) if found is not None else None
            if old is None or old.holder != holder:
                raise LeaseLost(f"{holder!r} no longer holds the {self.where}")
            now = self.clock.now()
            try:
                return await self._write(found, holder, old.epoch, old.acquired_at, now, duration_s)
            except _Conflict:
                continue
        raise LeaseLost(f"{holder!r} lost every write race for the {self.where}")

    async def _release(self, holder: str) -> None:
        for _ in range(_CAS_ATTEMPTS):
            found = await self._get()
            old = _record(found) if found is not None else None
            if old is None or old.holder != holder:
                return
            try:
                # client-go's release: an empty holder, a one-second lease, renewed now.
                await self._write(found, "", old.epoch, old.acquired_at, self.clock.now(), 0.0)
            except _Conflict:
                continue
            return

    async def _read(self) -> LeaseRecord | None:
        found = await self._get()
        return _record(found) if found is not None else None

    async def close(self) -> None:
        await self.client.close()

    # -- the Lease object ------------------------------------------------------------------

    async def _get(self) -> dict[str, Any] | None:
        name = self.config.lease_lock_name
        try:
            found = await self._call(f"read the {self.where}", "GET", self._path(name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise self._error(f"read the {self.where}", exc) from None
        return dict(found)

    async def _write(
        self,
        found: dict[str, Any] | None,
        holder: str,
        epoch: int,
        acquired: datetime,
        renewed: datetime,
        duration_s: float,
    ) -> LeaseRecord:
        """Create the Lease (``found is None``) or replace ``found`` at its resourceVersion.

        Raises:
            _Conflict: another writer created or changed it since it was read (409).
        """
        name, ns = self.config.lease_lock_name, self.config.lease_lock_namespace
        seconds = max(1, math.ceil(duration_s - 1e-9))
        spec: dict[str, Any] = {
            "holderIdentity": holder,
            "leaseDurationSeconds": seconds,
            "acquireTime": format_micro_time(acquired),
            "renewTime": format_micro_time(renewed),
            "leaseTransitions": epoch,
        }
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
        try:
            if found is None:
                stored = await self._call(f"create the {self.where}", "POST", self._path(), body)
            else:
                meta = found.get("metadata") or {}
                body["metadata"] = {
                    **meta,
                    "resourceVersion": str(meta.get("resourceVersion", "")),
                }
                stored = await self._call(f"update the {self.where}", "PUT", self._path(name), body)
        except ApiError as exc:
            if exc.status == 409 or (found is not None and exc.status == 404):
                raise _Conflict from None
            raise self._error(f"write the {self.where}", exc) from None
        return _record(dict(stored))

    def _path(self, name: str | None = None) -> str:
        ns = self.config.lease_lock_namespace
        path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
        return f"{path}/{name}" if name is not None else path

    async def _call(
        self, what: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            return await self.client.request(method, path, body=body)
        except Unreachable as exc:
            raise LeaseError(
                f"cannot {what}: the Kubernetes API server {self.client.where()} did not "
                f"answer ({exc})"
            ) from None

    def _error(self, what: str, exc: ApiError) -> LeaseError:
        if exc.status == 403:
            return LeaseError(
                f"cannot {what}: forbidden ({exc.message}); grant the agent's service account "
                "get, create and update on leases.coordination.k8s.io in "
                f"{self.config.lease_lock_namespace} (see streamspace_k8s/rbac.yaml)"
            )
        if exc.status == 404:
            return LeaseError(
                f"cannot {what}: {exc.message}; does LEASE_LOCK_NAMESPACE="
                f"{self.config.lease_lock_namespace} exist?"
            )
        return LeaseError(f"cannot {what}: {exc.message} (HTTP {exc.status})")


class _Conflict(Exception):
    """Another writer changed the Lease between our read and our write."""


def format_micro_time(value: datetime) -> str:
    """Format ``value`` as a Kubernetes MicroTime: RFC 3339, UTC, microseconds."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: object) -> datetime | None:
    """Parse a Kubernetes Time or MicroTime; ``None`` when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


_NEVER = datetime.fromtimestamp(0, UTC)


def _record(found: dict[str, Any]) -> LeaseRecord:
    """Read the lease from the object's spec; a record with missing times reads as free."""
    spec = found.get("spec") or {}
    renewed = parse_time(spec.get("renewTime"))
    acquired = parse_time(spec.get("acquireTime")) or renewed or _NEVER
    duration = spec.get("leaseDurationSeconds")
    holder = str(spec.get("holderIdentity") or "")
    if renewed is None or not isinstance(duration, int):
        renewed, expires = _NEVER, _NEVER
    else:
        expires = renewed + timedelta(seconds=duration)
    if not holder:
        expires = min(expires, renewed)  # released: free now, whatever the duration says
    transitions = spec.get("leaseTransitions")
    return LeaseRecord(
        holder=holder,
        epoch=transitions if isinstance(transitions, int) and transitions >= 0 else 0,
        acquired_at=acquired,
        renewed_at=renewed,
        expires_at=expires,
    )
