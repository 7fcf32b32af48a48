"""The ``swarm`` lease: the Raft store of Docker Swarm managers as the arbiter.

The lease lives in the labels of a Swarm config object, ``streamspace-lease-<LEASE_KEY>``.
Swarm versions every object and refuses an update that does not carry the version it
replaces ("update out of sequence"), so each step is a compare-and-swap decided by the
managers' Raft log: of two contenders that read the same version, one write wins and the
other is refused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import docker
import requests
from pydantic import Field, field_validator

from streamspace_sdk.clock import Clock
from streamspace_sdk.errors import LeaseError, LeaseLost
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.settings import Duration, StreamSpaceSettings, driver_settings

__all__ = ["LABEL_PREFIX", "SwarmLease"]

log = logging.getLogger(__name__)

LABEL_PREFIX = "io.streamspace.lease."
"""Prefix of the config labels holding the lease: ``holder``, ``epoch``, ``acquired``,
``renewed``, ``expires`` (times as ISO 8601, UTC)."""

_FIELDS = ("holder", "epoch", "acquired", "renewed", "expires")
_OUT_OF_SEQUENCE = re.compile(r"out of sequence", re.IGNORECASE)
_MANGLED = datetime.fromtimestamp(0, UTC)
"""The times of a record read from unreadable labels."""
_CAS_ATTEMPTS = 5
"""Reads and writes tried when a write loses to another (a release that raced a renew)."""

T = TypeVar("T")


class _Conflict(Exception):
    """Another writer changed the object between our read and our write."""


class SwarmLease(Lease):
    """A lease in a Swarm config's labels, changed only by versioned updates.

    Must talk to a Swarm manager (``DOCKER_HOST``): a worker or a standalone engine is a
    clear :class:`LeaseError`. Expiry times come from the injected clock (capability
    ``clock``), so the hosts of the replicas need synchronised clocks (NTP), as with
    Kubernetes leases.

    The epoch grows by one at each change of holder. When the config is missing (first use,
    or removed by hand), the new epoch starts from the clock in milliseconds, because the
    control plane refuses an epoch lower than the highest it saw: counting from 1 again
    would lock the agent out.
    """

    name: ClassVar[str] = "swarm"
    capabilities: ClassVar[frozenset[str]] = frozenset({"exclusive", "clock"})

    class Settings(StreamSpaceSettings):
        """Settings of the swarm lease, read from the environment."""

        docker_host: str = "unix:///var/run/docker.sock"
        """A Swarm manager's engine: ``unix:///path`` or ``tcp://host:port``."""

        lease_key: str = Field(
            default="docker-agent-leader", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$"
        )
        """Names the lease (config ``streamspace-lease-<LEASE_KEY>``); one per HA agent."""

        docker_api_timeout: Duration = Field(default=10.0, gt=0)
        """Seconds one call to the manager may take."""

        @field_validator("docker_host")
        @classmethod
        def _check_host(cls, value: str) -> str:
            scheme, sep, rest = value.partition("://")
            if not sep or scheme not in ("unix", "tcp", "http", "https") or not rest.strip("/"):
                raise ValueError(f"{value!r} is not unix:///path/to/docker.sock or tcp://host:port")
            return value

    def __init__(
        self, settings: StreamSpaceSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        settings = driver_settings(SwarmLease.Settings, settings, "SwarmLease")
        super().__init__(settings, clock=clock)
        self.config: SwarmLease.Settings = settings
        self.object_name = f"streamspace-lease-{settings.lease_key}"
        """The Swarm config holding the lease."""
        self._api: docker.APIClient | None = None
        self._api_lock = asyncio.Lock()

    # -- driver methods --------------------------------------------------------------------

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        for _ in range(_CAS_ATTEMPTS):
            found = await self._load()
            now, expires = self.expiry(duration_s)
            old = _record(found) if found is not None else None
            if old is not None and old.is_held(now) and old.holder != holder:
                return None
            same = old is not None and old.holder == holder
            if old is None or old.acquired_at == _MANGLED:
                # No trustworthy epoch to count from: start above any it could have held.
                epoch = max(old.epoch + 1 if old else 0, int(now.timestamp() * 1000))
            else:
                epoch = old.epoch if same else old.epoch + 1
            record = LeaseRecord(
                holder=holder,
                epoch=epoch,
                acquired_at=old.acquired_at if old is not None and same else now,
                renewed_at=now,
                expires_at=expires,
            )
            try:
                await self._store(found, record)
            except _Conflict:
                continue  # someone wrote first: look again
            if not same:
                log.info(
                    "Swarm lease %s acquired by %s (epoch %d)", self.object_name, holder, epoch
                )
            return record
        return None

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        for _ in range(_CAS_ATTEMPTS):
            found = await self._load()
            old = _record(found) if found is not None else None
            if old is None or old.holder != holder:
                raise LeaseLost(f"{holder!r} no longer holds the swarm lease {self.object_name}")
            now, expires = self.expiry(duration_s)
            record = old.model_copy(update={"renewed_at": now, "expires_at": expires})
            try:
                await self._store(found, record)
            except _Conflict:
                continue
            return record
        raise LeaseLost(f"{holder!r} lost every write race for the swarm lease {self.object_name}")

    async def _release(self, holder: str) -> None:
        for _ in range(_CAS_ATTEMPTS):
            found = await self._load()
            old = _record(found) if found is not None else None
            if old is None or old.holder != holder:
                return
            now = self.clock.now()
            try:
                await self._store(
                    found,
                    old.model_copy(update={"holder": "", "renewed_at": now, "expires_at": now}),
                )
            except _Conflict:
                continue
            return

    async def _read(self) -> LeaseRecord | None:
        found = await self._load()
        return _record(found) if found is not None else None

    async def close(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)

    # -- the config object -----------------------------------------------------------------

    async def _load(self) -> dict[str, Any] | None:
        """Return the config object (with its version), or ``None`` if there is none."""

        def load(api: docker.APIClient) -> dict[str, Any] | None:
            rows = api.configs(filters={"name": self.object_name})  # type: ignore[no-untyped-call]
            for row in rows:
                if row["Spec"]["Name"] == self.object_name:  # the filter matches prefixes
                    return dict(row)
            return None

        return await self._call(f"read the lease {self.object_name}", load)

    async def _store(self, found: dict[str, Any] | None, record: LeaseRecord) -> None:
        """Write ``record`` over ``found`` (creating the object when ``None``).

        Raises:
            _Conflict: another writer changed or created the object since it was read.
        """
        labels = _labels(record)

        def store(api: docker.APIClient) -> None:
            if found is None:
                api.create_config(self.object_name, b"streamspace lease\n", labels=labels)
                return
            spec = {**found["Spec"], "Labels": labels}
            url = f"{api.base_url}/v{api.api_version}/configs/{found['ID']}/update"
            response = api.post(url, json=spec, params={"version": found["Version"]["Index"]})
            if response.status_code >= 400:
                raise docker.errors.APIError(
                    response.text, response=response, explanation=_message(response)
                )

        try:
            await self._call(f"write the lease {self.object_name}", store, passing=True)
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            if exc.status_code == 409 or _OUT_OF_SEQUENCE.search(text):
                raise _Conflict from None
            raise LeaseError(f"cannot write the lease {self.object_name}: {text}") from None

    # -- the engine ------------------------------------------------------------------------

    async def _call(
        self, what: str, call: Callable[[docker.APIClient], T], *, passing: bool = False
    ) -> T:
        """Run ``call`` in a worker thread; turn engine trouble into a clear ``LeaseError``."""
        try:
            api = await self._client()
            return await asyncio.to_thread(call, api)
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            if exc.status_code == 503 or "not a swarm manager" in text.lower():
                raise LeaseError(
                    f"HA_BACKEND=swarm needs a Docker Swarm manager, and the engine at "
                    f"{self.config.docker_host} is not one ({text}); run `docker swarm init` "
                    "or point DOCKER_HOST at a manager"
                ) from None
            if passing:
                raise
            raise LeaseError(f"cannot {what}: {text}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise LeaseError(
                f"cannot {what}: the Docker engine at {self.config.docker_host} did not answer "
                f"({exc})"
            ) from None

    async def _client(self) -> docker.APIClient:
        async with self._api_lock:
            if self._api is None:
                self._api = await asyncio.to_thread(self._new_client)
            return self._api

    def _new_client(self) -> docker.APIClient:
        host = self.config.docker_host
        if host.startswith("unix://"):
            # Try the socket first: docker's client leaks its socket when the connect fails.
            path = "/" + host.removeprefix("unix://").lstrip("/")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(self.config.docker_api_timeout)
                try:
                    probe.connect(path)
                except OSError as exc:
                    raise docker.errors.DockerException(
                        f"cannot connect to {path}: {exc.strerror or exc}"
                    ) from None
        return docker.APIClient(
            base_url=host, version="auto", timeout=round(self.config.docker_api_timeout) or 1
        )


def _labels(record: LeaseRecord) -> dict[str, str]:
    values = {
        "holder": record.holder,
        "epoch": str(record.epoch),
        "acquired": record.acquired_at.isoformat(),
        "renewed": record.renewed_at.isoformat(),
        "expires": record.expires_at.isoformat(),
    }
    return {LABEL_PREFIX + k: v for k, v in values.items()}


def _record(found: dict[str, Any]) -> LeaseRecord:
    """Read the lease from the object's labels; a mangled one reads as free at its epoch."""
    labels = found["Spec"].get("Labels") or {}
    values = {k: labels.get(LABEL_PREFIX + k) for k in _FIELDS}
    try:
        return LeaseRecord(
            holder=values["holder"] or "",
            epoch=int(values["epoch"] or 0),
            acquired_at=datetime.fromisoformat(values["acquired"] or ""),
            renewed_at=datetime.fromisoformat(values["renewed"] or ""),
            expires_at=datetime.fromisoformat(values["expires"] or ""),
        )
    except (TypeError, ValueError):
        log.warning("Swarm lease labels %s are unreadable; treating the lease as free", labels)
        epoch = values["epoch"]
        return LeaseRecord(
            holder="",
            epoch=int(epoch) if epoch and epoch.isdigit() else 0,
            acquired_at=_MANGLED,
            renewed_at=_MANGLED,
            expires_at=_MANGLED,
        )


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text
