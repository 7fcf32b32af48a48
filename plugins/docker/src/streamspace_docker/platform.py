"""The ``docker`` platform: one container per session on a Docker engine.

The engine is the record of truth: every container, volume and network the platform makes
carries labels, so a restarted agent (or a new HA leader) finds the sessions by label and
adopts them. Calls to the engine go through the blocking ``docker`` library in worker
threads, so they never stall the agent's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import docker
import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streamspace_sdk.errors import PlatformError, SessionNotFound
from streamspace_sdk.platform import (
    LABEL_AGENT_ID,
    LABEL_MANAGED_BY,
    LABEL_SESSION_ID,
    LABEL_USER,
    MANAGED_BY,
    Capacity,
    Platform,
    SessionSpec,
    SessionState,
    SessionStatus,
    Usage,
    VncEndpoint,
)
from streamspace_sdk.settings import Duration, PullPolicy, StreamSpaceSettings, driver_settings

__all__ = [
    "LABEL_DESIRED",
    "LABEL_GENERATION",
    "LABEL_SPEC",
    "DockerOptions",
    "DockerPlatform",
]

log = logging.getLogger(__name__)

LABEL_GENERATION = "streamspace.io/generation"
"""Container label: the generation of the command that made the container."""
LABEL_DESIRED = "streamspace.io/desired"
"""Container label: ``running``, or ``hibernated`` for a container kept only to hold a
hibernated session's configuration."""
LABEL_SPEC = "streamspace.io/spec"
"""Container label: the session's spec as JSON, so a new agent process can recreate it."""
LABEL_VOLUME = "streamspace.io/volume"
"""Volume label: ``home`` (a user's persistent home) or ``session`` (removed at stop)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RFB_BANNER = re.compile(rb"RFB \d{3}\.\d{3}\n")
_MIN_API = (1, 41)
"""Docker Engine 20.10, the oldest the seed supports."""
_POLL_S = 0.05
"""Interval of the VNC readiness probe: nothing can tell us when a server inside starts."""
_STATE_CHECK_S = 0.5
"""How often a start looks at the container's state while it waits for VNC."""
_LOG_LINES = 20

T = TypeVar("T")


class DockerOptions(BaseModel):
    """What a template may set in ``platform_options`` for the ``docker`` platform."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    home_path: str | None = Field(default=None, pattern=r"^/")
    """Where the home volume is mounted and ``HOME`` points; unset: ``DOCKER_HOME_PATH``."""
    user: str | None = None
    """User (name or ``uid[:gid]``) the container runs as; unset: the image's."""
    shm_size_mib: int | None = Field(default=None, ge=1)
    """Size of ``/dev/shm`` in MiB (browsers want 512 or more); unset: Docker's 64."""


@dataclass(frozen=True)
class _Container:
    """One session container, as the engine's list call shows it."""

    id: str
    name: str
    state: str
    status: str
    labels: dict[str, str]
    ports: list[dict[str, Any]]
    networks: dict[str, Any]

    @property
    def session_id(self) -> str:
        return self.labels.get(LABEL_SESSION_ID, "")

    @property
    def generation(self) -> int:
        try:
            return int(self.labels.get(LABEL_GENERATION, "0"))
        except ValueError:
            return 0

    @property
    def desired(self) -> str:
        return self.labels.get(LABEL_DESIRED, "running")

    def spec(self) -> SessionSpec | None:
        raw = self.labels.get(LABEL_SPEC)
        if raw is None:
            return None
        try:
            return SessionSpec.model_validate_json(raw)
        except ValidationError:
            return None


@dataclass
class _Debris:
    """What a failed start or hibernate could not clean up because the engine was away."""

    volume: str | None = None
    """A session volume made for the failed start."""
    restore: SessionSpec | None = None
    """A hibernated session to put back (its placeholder was removed)."""


class DockerPlatform(Platform):
    """Runs each session as a container on one Docker engine; the ``docker`` platform.

    Per session: a container named ``<NETWORK_PREFIX>-<session id>`` from the template's
    image (its ``command``, if set, replaces the image's), labelled with the standard labels,
    the generation and the spec; on the agent's user network ``<NETWORK_PREFIX>-<agent id>``;
    with the template's CPU and memory as limits (``cpu_limit_m`` → ``--cpus``,
    ``memory_limit_mib`` → ``--memory``, requests → ``--cpu-shares`` and
    ``--memory-reservation``), ``--pids-limit``, ``no-new-privileges`` and an init process.

    Homes are named volumes mounted at ``DOCKER_HOME_PATH`` (or the template's
    ``home_path``), where ``HOME`` points: ``<prefix>-home-<user>`` when the template asks
    for a persistent home (kept at stop, so the user's next session finds its files), else
    ``<prefix>-session-<session id>`` (removed at stop). The platform mounts only volumes it
    labelled itself; a foreign volume of that name is refused, never reused.

    VNC (``VNC_ACCESS``): ``loopback`` publishes the session's ``vnc_port`` on 127.0.0.1 on
    a port the engine picks, for an agent on the engine's host; ``network`` publishes
    nothing and the agent reaches the container's address on the user network (run the
    agent in a container and name it in ``AGENT_CONTAINER``, which the platform then attaches
    to the network). Never on 0.0.0.0. In ``loopback`` mode the network forbids traffic
    between containers, so sessions cannot reach each other's VNC servers.

    ``start`` returns ``running`` once the VNC port answers with an RFB banner. If the
    container exits first, or ``DOCKER_START_TIMEOUT`` passes, it removes the container (and a
    session volume it made) and raises :class:`PlatformError` with the container's last
    output. Images follow ``IMAGE_PULL_POLICY``: ``IfNotPresent`` pulls a missing image,
    ``Always`` pulls at every start, ``Never`` only uses what the engine has.

    Hibernate stops the container and keeps the home volume. Docker labels cannot change, so
    the stopped container is replaced by a created, never started one carrying the hibernate
    generation; wake starts a fresh container on the same volume. Anything outside the home
    volume (``/tmp``, installed packages) is gone after a hibernate, as on Kubernetes.

    Capabilities: ``hibernate``, ``persistent_home`` and ``adopt``.
    """

    name: ClassVar[str] = "docker"
    capabilities: ClassVar[frozenset[str]] = frozenset({"hibernate", "persistent_home", "adopt"})

    class Settings(StreamSpaceSettings):
        """Settings of the ``docker`` platform, read from the environment."""

        docker_host: str = "unix:///var/run/docker.sock"
        """The engine's address: ``unix:///path`` or ``tcp://host:port`` (as Docker's own)."""

        docker_tls_verify: bool = False
        """Talk TLS to a ``tcp://`` engine and verify it, with the files in ``DOCKER_CERT_PATH``."""

        docker_cert_path: Path | None = None
        """Directory of ``ca.pem``, ``cert.pem`` and ``key.pem`` for a TLS engine."""

        network_prefix: str = Field(default="streamspace", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
        """Prefix of the names of the networks, containers and volumes the platform makes."""

        max_sessions: int = Field(default=10, ge=0)
        """Sessions this engine runs at once for the agent (``MAX_SESSIONS``, as the agent's)."""

        image_pull_policy: PullPolicy = "IfNotPresent"
        """``IfNotPresent``, ``Always`` or ``Never``, as Kubernetes's (case does not matter)."""

        vnc_access: Literal["loopback", "network"] = "loopback"
        """How the agent reaches a session's VNC server: a port published on 127.0.0.1, or
        the container's address on the user network."""

        agent_container: str | None = None
        """With ``VNC_ACCESS=network``: the agent's own container, attached to the network."""

        docker_home_path: str = Field(default="/home/streamspace", pattern=r"^/")
        """Where the home volume is mounted in the container; templates may override it."""

        docker_start_timeout: Annotated[Duration, Field(gt=0)] = 60.0
        """Seconds from creating the container to its VNC server answering (pulls excluded)."""

        docker_pull_timeout: Annotated[Duration, Field(gt=0)] = 600.0
        """Seconds an image pull may take."""

        docker_stop_timeout: Annotated[Duration, Field(ge=0)] = 10.0
        """Seconds between SIGTERM and SIGKILL when a session's container stops."""

        docker_api_timeout: Annotated[Duration, Field(gt=0)] = 60.0
        """Seconds one call to the engine may take before it counts as unanswered."""

        docker_pids_limit: int = Field(default=1024, ge=0)
        """Processes one session may run (0: no limit); stops fork bombs."""

        @field_validator("docker_host")
        @classmethod
        def _check_host(cls, value: str) -> str:
            scheme, sep, rest = value.partition("://")
            if not sep or scheme not in ("unix", "tcp", "http", "https") or not rest.strip("/"):
                raise ValueError(f"{value!r} is not unix:///path/to/docker.sock or tcp://host:port")
            return value

    def __init__(self, settings: StreamSpaceSettings | None = None, *, agent_id: str) -> None:
        settings = driver_settings(DockerPlatform.Settings, settings, "DockerPlatform")
        super().__init__(settings, agent_id=agent_id)
        self.config: DockerPlatform.Settings = settings
        self.network = f"{settings.network_prefix}-{agent_id}"
        """The agent's user network."""
        self._api: docker.APIClient | None = None
        self._api_lock = asyncio.Lock()
        self._admission = asyncio.Lock()
        self._starting: dict[str, int] = {}
        self._applied: dict[str, int] = {}
        self._debris: dict[str, _Debris] = {}
        self._engine_id: str | None = None

    # -- names -------------------------------------------------------------------------------

    def container_name(self, session_id: str) -> str:
        """The name of the session's container."""
        return f"{self.config.network_prefix}-{_safe(session_id)}"

    def home_volume(self, spec: SessionSpec) -> str:
        """The name of the volume mounted as the session's home."""
        prefix = self.config.network_prefix
        if spec.persistent_home:
            return f"{prefix}-home-{_safe(spec.user)}"
        return f"{prefix}-session-{_safe(spec.session_id)}"

    # -- checks ------------------------------------------------------------------------------

    async def check(self) -> None:
        """Fail now, saying what to fix, if the engine cannot be reached or is too old.

        Raises:
            PlatformError: naming ``DOCKER_HOST`` and what went wrong.
        """
        version = await self._engine("ask the engine its version", lambda api: api.version())
        api = str(version.get("ApiVersion", "0.0"))
        if tuple(int(p) for p in api.split(".")[:2]) < _MIN_API:
            raise PlatformError(
                f"the Docker engine at {self.config.docker_host} speaks API {api}; "
                "the docker platform needs Docker Engine 20.10 (API 1.41) or newer"
            )
        info = await self._engine("read the engine's facts", lambda api: api.info())
        self._engine_id = str(info.get("ID") or "") or None
        agent = self.config.agent_container
        if agent is not None:
            await self._engine(
                f"find AGENT_CONTAINER {agent!r}", lambda api: api.inspect_container(agent)
            )
        log.info(
            "Connected to Docker daemon at %s (Docker %s, API %s, %s CPUs)",
            self.config.docker_host,
            version.get("Version", "?"),
            api,
            info.get("NCPU", "?"),
        )

    def instance_scope(self) -> str:
        """The engine: agents talking to the same engine manage the same sessions."""
        if self._engine_id is not None:
            return f"docker:{self._engine_id}"
        host = self.config.docker_host
        return f"{socket.gethostname()}:{host}" if host.startswith("unix:") else host

    async def close(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)

    # -- driver methods ----------------------------------------------------------------------

    async def _start(self, spec: SessionSpec) -> SessionStatus:
        options = self.options(spec, DockerOptions)
        if not spec.image:
            raise PlatformError("the docker platform needs an image: set the template's image")
        sid = spec.session_id
        await self._sweep(sid)
        previous = await self._container(sid)
        if previous is not None and previous.desired == "running" and previous.state == "running":
            # Already running under an older generation: it is what was asked for. Labels
            # cannot change, so this process remembers the generation.
            self._applied[sid] = spec.generation
            return self._observe(previous)
        await self._admit(sid, spec.generation)
        try:
            return await self._launch(spec, options, previous)
        finally:
            self._starting.pop(sid, None)

    async def _wake(self, spec: SessionSpec) -> SessionStatus:
        return await self._start(spec)  # the hibernated container's volume is reused

    async def _stop(self, session_id: str, generation: int) -> SessionStatus:
        found = await self._container(session_id)
        spec = found.spec() if found is not None else None
        await self._remove_session_containers(session_id)
        if spec is not None and not spec.persistent_home:
            await self._remove_volume(self.home_volume(spec))
        self._applied.pop(session_id, None)
        return SessionStatus(session_id=session_id, generation=generation, state="stopped")

    async def _hibernate(self, session_id: str, generation: int) -> SessionStatus:
        found = await self._container(session_id)
        spec = found.spec() if found is not None else None
        if found is None or spec is None:
            raise SessionNotFound(f"no session {session_id!r} to hibernate")
        await self._remove_session_containers(session_id)
        hibernated = spec.model_copy(update={"generation": generation})
        try:
            await self._create(
                hibernated, self.options(hibernated, DockerOptions), desired="hibernated"
            )
        except PlatformError:
            self._debris[session_id] = _Debris(restore=hibernated)
            raise
        self._applied.pop(session_id, None)
        status = await self._status(session_id)
        assert status is not None
        return status

    async def _status(self, session_id: str) -> SessionStatus | None:
        await self._sweep(session_id)
        found = await self._container(session_id)
        if found is None:
            if session_id in self._starting:
                return self._starting_status(session_id)
            return None
        return await self._observe_fully(found)

    async def _list_sessions(self) -> list[SessionStatus]:
        await self._sweep()
        found = await self._containers()
        statuses = [await self._observe_fully(c) for c in found]
        listed = {c.session_id for c in found}
        statuses += [self._starting_status(s) for s in self._starting if s not in listed]
        return statuses

    async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
        found = await self._container(session_id)
        status = self._observe(found) if found is not None else None
        if status is None or status.state != "running" or status.vnc is None:
            state = status.state if status is not None else "unknown"
            raise SessionNotFound(f"session {session_id!r} is not running ({state})")
        return status.vnc

    async def _capacity(self) -> Capacity:
        info = await self._engine("read the engine's facts", lambda api: api.info())
        cpus, memory = info.get("NCPU"), info.get("MemTotal")
        return Capacity(
            max_sessions=self.config.max_sessions,
            max_cpu_m=int(cpus) * 1000 if isinstance(cpus, int) and cpus > 0 else None,
            max_memory_mib=int(memory) // 2**20 if isinstance(memory, int) and memory > 0 else None,
        )

    async def usage(self) -> Usage:
        """Count active sessions and the CPU and memory their templates request."""
        await self._sweep()
        containers = await self._containers()
        active = [c for c in containers if self._observe(c).state in ("starting", "running")]
        listed = {c.session_id for c in containers}
        specs = [spec for c in active if (spec := c.spec()) is not None]
        return Usage(
            sessions=len(active) + sum(1 for sid in self._starting if sid not in listed),
            cpu_m=sum(s.resources.cpu_request_m or s.resources.cpu_limit_m or 0 for s in specs),
            memory_mib=sum(
                s.resources.memory_request_mib or s.resources.memory_limit_mib or 0 for s in specs
            ),
        )

    # -- starting ----------------------------------------------------------------------------

    async def _admit(self, session_id: str, generation: int) -> None:
        """Take a place for the session, or raise if ``MAX_SESSIONS`` are active."""
        async with self._admission:
            active = {
                s.session_id
                for s in await self._list_sessions()
                if s.state in ("starting", "running") and s.session_id != session_id
            }
            limit = self.config.max_sessions
            if len(active) >= limit:
                raise PlatformError(
                    f"this agent runs {len(active)} sessions on the engine, its MAX_SESSIONS "
                    f"({limit}); session {session_id!r} was not started"
                )
            self._starting[session_id] = generation

    async def _launch(
        self, spec: SessionSpec, options: DockerOptions, previous: _Container | None
    ) -> SessionStatus:
        """Create and start the container and wait for VNC; undo everything on error."""
        sid = spec.session_id
        await self._ensure_image(spec.image or "")
        await self._ensure_network()
        volume, made_volume = await self._ensure_volume(spec)
        try:
            await self._remove_session_containers(sid)
            container_id = await self._create(spec, options, desired="running")
            await self._engine(
                f"start the container of session {sid!r}",
                lambda api: api.start(container_id),
            )
            await self._await_vnc(sid, container_id)
        except BaseException as exc:
            hibernated = previous is not None and previous.desired == "hibernated"
            restore = previous.spec() if previous is not None and hibernated else None
            await self._undo(sid, volume if made_volume else None, restore)
            if isinstance(exc, PlatformError):
                raise
            if isinstance(exc, Exception):
                raise PlatformError(f"session {sid!r} did not start: {exc}") from exc
            raise
        self._applied.pop(sid, None)
        self._starting.pop(sid, None)
        found = await self._container(sid)
        if found is None:
            raise PlatformError(f"the container of session {sid!r} vanished as it started")
        return self._observe(found)

    async def _undo(self, session_id: str, volume: str | None, restore: SessionSpec | None) -> None:
        """Leave things as before a failed start (``restore``: the hibernated session to put
        back); if the engine is away, try again later."""
        try:
            await self._remove_session_containers(session_id)
            if volume is not None:
                await self._remove_volume(volume)
            if restore is not None:
                options = self.options(restore, DockerOptions)
                await self._create(restore, options, desired="hibernated")
        except PlatformError as exc:
            log.warning("session %s: cleaning up after a failed start failed: %s", session_id, exc)
            self._debris[session_id] = _Debris(volume=volume, restore=restore)

    async def _sweep(self, session_id: str | None = None) -> None:
        """Finish cleanups that failed while the engine was away."""
        for sid in [session_id] if session_id is not None else list(self._debris):
            debris = self._debris.pop(sid, None)
            if debris is None:
                continue
            log.info("session %s: finishing the cleanup of a failed operation", sid)
            await self._undo(sid, debris.volume, debris.restore)

    async def _ensure_image(self, image: str) -> None:
        policy = self.config.image_pull_policy
        if policy != "Always":
            try:
                await self._engine(
                    f"look up image {image!r}",
                    lambda api: api.inspect_image(image),  # type: ignore[no-untyped-call]
                    expect=(docker.errors.ImageNotFound,),
                )
                return
            except docker.errors.ImageNotFound:
                if policy == "Never":
                    raise PlatformError(
                        f"image {image!r} is not on the Docker engine and IMAGE_PULL_POLICY is "
                        "Never: build or load it on the engine first (docker build, docker "
                        "load, docker import), or allow pulls with IMAGE_PULL_POLICY=IfNotPresent"
                    ) from None
        await self._pull(image)

    async def _pull(self, image: str) -> None:
        repository, tag = _split_image(image)
        log.info("Pulling image %s (IMAGE_PULL_POLICY %s)", image, self.config.image_pull_policy)

        def pull(api: docker.APIClient) -> None:
            layers: dict[str, str] = {}
            last = time.monotonic()
            for event in api.pull(repository, tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise PlatformError(f"cannot pull image {image!r}: {event['error']}")
                if "id" in event and "status" in event:
                    layers[event["id"]] = event["status"]
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    done = sum(
                        1 for s in layers.values() if s in ("Pull complete", "Already exists")
                    )
                    log.info("Pulling image %s: %d of %d layers done", image, done, len(layers))

        try:
            await asyncio.wait_for(
                self._engine(f"pull image {image!r}", pull, expect=(docker.errors.APIError,)),
                self.config.docker_pull_timeout,
            )
        except TimeoutError:
            raise PlatformError(
                f"pulling image {image!r} took more than DOCKER_PULL_TIMEOUT "
                f"({self.config.docker_pull_timeout:g}s)"
            ) from None
        except docker.errors.APIError as exc:
            raise PlatformError(f"cannot pull image {image!r}: {_explain(exc)}") from None
        log.info("Pulled image %s", image)

    async def _ensure_network(self) -> None:
        name = self.network
        try:
            found = await self._engine(
                f"look up network {name!r}",
                lambda api: api.inspect_network(name),
                expect=(docker.errors.NotFound,),
            )
        except docker.errors.NotFound:
            loopback = self.config.vnc_access == "loopback"
            try:
                await self._engine(
                    f"create network {name!r}",
                    lambda api: api.create_network(
                        name,
                        driver="bridge",
                        check_duplicate=True,
                        labels={LABEL_AGENT_ID: self.agent_id, LABEL_MANAGED_BY: MANAGED_BY},
                        # Sessions have passwordless VNC servers: keep them from each other
                        # unless the agent itself must reach them on this network.
                        options={"com.docker.network.bridge.enable_icc": str(not loopback).lower()},
                    ),
                    expect=(docker.errors.APIError,),
                )
                log.info("Created network %s", name)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # another agent process made it first
                    raise PlatformError(
                        f"cannot create network {name!r}: {_explain(exc)}"
                    ) from None
            found = await self._engine(
                f"look up network {name!r}", lambda api: api.inspect_network(name)
            )
        agent = self.config.agent_container
        if agent is not None and self.config.vnc_access == "network":
            attached = await self._engine(
                f"find AGENT_CONTAINER {agent!r}", lambda api: api.inspect_container(agent)
            )
            if attached["Id"] not in (found.get("Containers") or {}):
                await self._engine(
                    f"attach AGENT_CONTAINER {agent!r} to network {name!r}",
                    lambda api: api.connect_container_to_network(agent, name),
                )

    async def _ensure_volume(self, spec: SessionSpec) -> tuple[str, bool]:
        """Return the home volume's name and whether this call made it."""
        name = self.home_volume(spec)
        try:
            found = await self._engine(
                f"look up volume {name!r}",
                lambda api: api.inspect_volume(name),
                expect=(docker.errors.NotFound,),
            )
            made = False
        except docker.errors.NotFound:
            labels = {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_USER: spec.user,
                LABEL_VOLUME: "home" if spec.persistent_home else "session",
            }
            if not spec.persistent_home:
                labels |= {LABEL_SESSION_ID: spec.session_id, LABEL_AGENT_ID: self.agent_id}
            found = await self._engine(
                f"create volume {name!r}", lambda api: api.create_volume(name, labels=labels)
            )
            made = True
        labels = found.get("Labels") or {}
        if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or labels.get(LABEL_USER) != spec.user:
            raise PlatformError(
                f"volume {name!r} exists but was not made by StreamSpace for user "
                f"{spec.user!r} (labels {labels}); it is left alone and not mounted: remove "
                "or rename it, or set NETWORK_PREFIX to another prefix"
            )
        return name, made

    async def _create(self, spec: SessionSpec, options: DockerOptions, *, desired: str) -> str:
        """Create the session's container (not started); return its id."""
        name = self.container_name(spec.session_id)
        kwargs = self.container_config(spec, options, desired=desired)

        def create(api: docker.APIClient) -> str:
            kwargs["host_config"] = api.create_host_config(**kwargs["host_config"])
            return str(api.create_container(**kwargs)["Id"])

        try:
            return await self._engine(
                f"create container {name!r}", create, expect=(docker.errors.APIError,)
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise PlatformError(await self._conflict(name)) from None
            raise PlatformError(
                f"cannot create the container of session {spec.session_id!r}: {_explain(exc)}"
            ) from None

    def container_config(
        self, spec: SessionSpec, options: DockerOptions, *, desired: str = "running"
    ) -> dict[str, Any]:
        """Return the keyword arguments of ``create_container`` for ``spec``; the
        ``host_config`` entry holds those of ``create_host_config``."""
        home = options.home_path or self.config.docker_home_path
        port = spec.vnc_port
        r = spec.resources
        host_config: dict[str, Any] = {
            "binds": {self.home_volume(spec): {"bind": home, "mode": "rw"}},
            "network_mode": self.network,
            "init": True,
            "security_opt": ["no-new-privileges"],
        }
        if self.config.vnc_access == "loopback":
            host_config["port_bindings"] = {port: ("127.0.0.1",)}
        if self.config.docker_pids_limit:
            host_config["pids_limit"] = self.config.docker_pids_limit
        if r.cpu_limit_m is not None:
            host_config["nano_cpus"] = r.cpu_limit_m * 1_000_000
        if r.cpu_request_m is not None:
            host_config["cpu_shares"] = max(2, r.cpu_request_m * 1024 // 1000)
        if r.memory_limit_mib is not None:
            host_config["mem_limit"] = r.memory_limit_mib * 2**20
        if r.memory_request_mib is not None:
            host_config["mem_reservation"] = r.memory_request_mib * 2**20
        if options.shm_size_mib is not None:
            host_config["shm_size"] = options.shm_size_mib * 2**20
        env = {
            "HOME": home,
            "VNC_PORT": str(port),
            "STREAMSPACE_SESSION_ID": spec.session_id,
            "STREAMSPACE_USER": spec.user,
            **spec.env,
        }
        labels = {
            **spec.labels,
            LABEL_GENERATION: str(spec.generation),
            LABEL_DESIRED: desired,
            LABEL_SPEC: spec.model_dump_json(),
        }
        config: dict[str, Any] = {
            "image": spec.image,
            "name": self.container_name(spec.session_id),
            "labels": labels,
            "environment": env,
            "ports": [port],
            "host_config": host_config,
        }
        if spec.command:
            config["command"] = spec.command
        if options.user is not None:
            config["user"] = options.user
        return config

    async def _conflict(self, name: str) -> str:
        """Explain a name taken by a container that is not this session's."""
        try:
            other = await self._engine(
                f"look up container {name!r}",
                lambda api: api.inspect_container(name),
                expect=(docker.errors.NotFound,),
            )
        except docker.errors.NotFound:
            return f"the container name {name!r} was taken and freed while this start ran"
        labels = (other.get("Config") or {}).get("Labels") or {}
        owner = labels.get(LABEL_AGENT_ID)
        whose = f"belongs to agent {owner!r}" if owner else "is not managed by StreamSpace"
        return (
            f"a container named {name!r} already exists and {whose} (id {other['Id'][:12]}); "
            "it is left alone: remove or rename it, or set NETWORK_PREFIX to another prefix"
        )

    async def _await_vnc(self, session_id: str, container_id: str) -> None:
        """Wait until the VNC server answers with an RFB banner, or fail with the container's
        output when it exits or ``DOCKER_START_TIMEOUT`` passes."""
        timeout = self.config.docker_start_timeout
        deadline = time.monotonic() + timeout
        checked = 0.0
        endpoint: VncEndpoint | None = None
        while True:
            now = time.monotonic()
            if endpoint is None or now - checked > _STATE_CHECK_S:
                checked = now
                found = await self._container(session_id)
                if found is None or found.id != container_id:
                    raise PlatformError(f"the container of session {session_id!r} was removed")
                if found.state not in ("running", "created", "restarting"):
                    tail = await self._logs(container_id)
                    raise PlatformError(
                        f"session {session_id!r} exited during start ({found.status}); its "
                        f"output ends:\n{tail}"
                    )
                endpoint = self._endpoint(found)
            if endpoint is not None and await _answers_rfb(endpoint, deadline - now):
                return
            if time.monotonic() > deadline:
                tail = await self._logs(container_id)
                raise PlatformError(
                    f"session {session_id!r} did not answer on its VNC port within "
                    f"DOCKER_START_TIMEOUT ({timeout:g}s); its output ends:\n{tail}"
                )
            await asyncio.sleep(_POLL_S)

    async def _logs(self, container_id: str) -> str:
        with contextlib.suppress(PlatformError):
            raw = await self._engine(
                "read the container's output",
                lambda api: api.logs(container_id, tail=_LOG_LINES),
            )
            return bytes(raw).decode(errors="replace").rstrip() or "(no output)"
        return "(its output could not be read)"

    # -- removing ----------------------------------------------------------------------------

    async def _remove_session_containers(self, session_id: str) -> None:
        """Stop and remove every container of the session (normally one)."""
        stop_s = round(self.config.docker_stop_timeout)
        for found in await self._containers(session_id):

            def remove(api: docker.APIClient, cid: str = found.id) -> None:
                with contextlib.suppress(docker.errors.NotFound):
                    api.stop(cid, timeout=stop_s)
                    api.remove_container(cid, force=True)

            await self._engine(f"remove the container of session {session_id!r}", remove)

    async def _remove_volume(self, name: str) -> None:
        def remove(api: docker.APIClient) -> None:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_volume(name)

        await self._engine(f"remove volume {name!r}", remove)

    # -- observing ---------------------------------------------------------------------------

    async def _containers(self, session_id: str | None = None) -> list[_Container]:
        labels = [f"{LABEL_AGENT_ID}={self.agent_id}", f"{LABEL_MANAGED_BY}={MANAGED_BY}"]
        if session_id is not None:
            labels.append(f"{LABEL_SESSION_ID}={session_id}")
        rows = await self._engine(
            "list session containers",
            lambda api: api.containers(all=True, filters={"label": labels}),
        )
        found = [_row(row) for row in rows]
        if session_id is not None:  # label filters match exactly, but be sure
            found = [c for c in found if c.session_id == session_id]
        return found

    async def _container(self, session_id: str) -> _Container | None:
        found = await self._containers(session_id)
        return found[0] if found else None

    def _starting_status(self, session_id: str) -> SessionStatus:
        return SessionStatus(
            session_id=session_id,
            generation=self._starting[session_id],
            state="starting",
            detail="creating the container",
        )

    async def _observe_fully(self, found: _Container) -> SessionStatus:
        """:meth:`_observe`, with the exit code and OOM kill of a failed container."""
        status = self._observe(found)
        if status.state == "failed" and found.state in ("exited", "dead"):
            with contextlib.suppress(PlatformError):
                full = await self._engine(
                    "inspect a container", lambda api: api.inspect_container(found.id)
                )
                state = full.get("State") or {}
                why = "killed: out of memory" if state.get("OOMKilled") else ""
                why = why or state.get("Error") or f"exit code {state.get('ExitCode')}"
                status = status.model_copy(update={"detail": f"container exited ({why})"})
        return status

    def _observe(self, found: _Container) -> SessionStatus:
        sid = found.session_id
        generation = max(found.generation, self._applied.get(sid, 0))
        state: SessionState
        detail = ""
        vnc = None
        if sid in self._starting:
            state, generation, detail = "starting", self._starting[sid], "waiting for VNC"
        elif found.desired == "hibernated" and found.state != "running":
            state = "hibernated"
        elif found.state == "running":
            state, vnc = "running", self._endpoint(found)
            if vnc is None:
                state, detail = "failed", "its VNC port is not published"
        elif found.state == "restarting":
            state, detail = "starting", "the container is restarting"
        elif found.state == "removing":
            state = "stopping"
        elif found.state == "created":
            state, detail = "failed", "created but never started (an interrupted start)"
        elif found.state == "paused":
            state, detail = "failed", "the container was paused outside StreamSpace"
        else:
            state, detail = "failed", f"container {found.status.lower() or found.state}"
        return SessionStatus(
            session_id=sid,
            generation=generation,
            state=state,
            detail=detail,
            vnc=vnc,
            platform_metadata={
                "container_id": found.id[:12],
                "container": found.name,
                "network": self.network,
            },
        )

    def _endpoint(self, found: _Container) -> VncEndpoint | None:
        spec = found.spec()
        port = spec.vnc_port if spec is not None else 5900
        if self.config.vnc_access == "network":
            net = found.networks.get(self.network) or {}
            address = net.get("IPAddress")
            return VncEndpoint(host=address, port=port) if address else None
        for binding in found.ports:
            published = binding.get("PrivatePort") == port and binding.get("PublicPort")
            if published and binding.get("IP") == "127.0.0.1":
                return VncEndpoint(host="127.0.0.1", port=int(binding["PublicPort"]))
        return None

    # -- the engine --------------------------------------------------------------------------

    async def _engine(
        self,
        what: str,
        call: Callable[[docker.APIClient], T],
        *,
        expect: tuple[type[docker.errors.APIError], ...] = (),
    ) -> T:
        """Run ``call`` with the engine client in a worker thread.

        Raises:
            PlatformError: the engine cannot be reached, or answered with an error not in
                ``expect`` (naming ``DOCKER_HOST`` or the engine's reason, and ``what``).
            docker.errors.APIError: an error in ``expect``, for the caller to handle.
        """
        try:
            api = await self._client()
            return await asyncio.to_thread(call, api)
        except expect:
            raise
        except docker.errors.APIError as exc:
            raise PlatformError(f"cannot {what}: {_explain(exc)}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise PlatformError(
                f"cannot {what}: the Docker engine at {self.config.docker_host} did not answer "
                f"({_root_cause(exc)}); is dockerd running, and may this agent use it "
                "(for a unix socket: the docker group)?"
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
        tls: docker.tls.TLSConfig | bool = False
        if self.config.docker_tls_verify or self.config.docker_cert_path is not None:
            certs = self.config.docker_cert_path or Path("~/.docker").expanduser()
            tls = docker.tls.TLSConfig(
                client_cert=(str(certs / "cert.pem"), str(certs / "key.pem")),
                ca_cert=str(certs / "ca.pem"),
                verify=self.config.docker_tls_verify,
            )
            host = host.replace("tcp://", "https://", 1)
        return docker.APIClient(
            base_url=host,
            version="auto",
            timeout=round(self.config.docker_api_timeout),
            tls=tls,
        )


# -- helpers ---------------------------------------------------------------------------------


def _safe(text: str) -> str:
    """Return ``text`` as a piece of a Docker object name, unique for each ``text``."""
    if _NAME.match(text) and len(text) <= 64:
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")[:40] or "x"
    return f"{cleaned}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _split_image(image: str) -> tuple[str, str]:
    """Split ``repo[:tag][@digest]`` into what the pull call wants; the tag defaults to latest."""
    if "@" in image:
        repository, digest = image.split("@", 1)
        return repository, digest
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return image, "latest"
    return repository, tag


def _row(row: dict[str, Any]) -> _Container:
    names = row.get("Names") or []
    return _Container(
        id=str(row["Id"]),
        name=str(names[0]).lstrip("/") if names else "",
        state=str(row.get("State", "")),
        status=str(row.get("Status", "")),
        labels=dict(row.get("Labels") or {}),
        ports=list(row.get("Ports") or []),
        networks=dict((row.get("NetworkSettings") or {}).get("Networks") or {}),
    )


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)


def _root_cause(exc: BaseException) -> str:
    seen = exc
    for link in _chain(exc):
        seen = link
    text = str(seen) or type(seen).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _chain(exc: BaseException) -> Iterator[BaseException]:
    current: BaseException | None = exc
    while current is not None:
        yield current
        nxt = current.__cause__ or current.__context__
        if nxt is None and current.args and isinstance(current.args[0], BaseException):
            nxt = current.args[0]
        current = nxt


async def _answers_rfb(endpoint: VncEndpoint, budget_s: float) -> bool:
    """Whether ``endpoint`` greets with an RFB banner within ``budget_s`` (at most 2 s)."""
    try:
        async with asyncio.timeout(max(0.05, min(budget_s, 2.0))):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            try:
                banner = await reader.readexactly(12)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    return bool(_RFB_BANNER.fullmatch(banner))
