"""Settings read from the environment, with the seed guide's variable names.

This is the only module that reads the environment. A bad value fails at start-up with a
:class:`~streamspace_sdk.errors.ConfigError` that names the variable.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamspace_sdk.errors import ConfigError

__all__ = [
    "AgentSettings",
    "Duration",
    "LogLevel",
    "PluginSettings",
    "PullPolicy",
    "StreamSpaceSettings",
    "driver_settings",
    "load_settings",
    "parse_duration",
]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def parse_duration(value: object) -> float:
    """Return seconds for ``15s``, ``500ms``, ``5m``, ``1h30m`` or a plain number of seconds.

    Raises:
        ValueError: the value is not a duration, or is negative.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("integer too large to be a duration in seconds") from None
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not text or "".join(n + u for n, u in parts) != text:
                raise ValueError(
                    f"{value!r} is not a duration; use seconds or a value like "
                    "15s, 500ms, 5m, 1h30m"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"{value!r} is not a duration")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"{value!r} is not a duration of zero or more seconds")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in the environment as ``15s``, ``500ms``, ``5m`` or a bare number."""


def _pull_policy(value: object) -> object:
    if isinstance(value, str):
        for policy in ("IfNotPresent", "Always", "Never"):
            if value.strip().lower() == policy.lower():
                return policy
    return value


PullPolicy = Annotated[Literal["IfNotPresent", "Always", "Never"], BeforeValidator(_pull_policy)]
"""``IMAGE_PULL_POLICY``: Kubernetes's image pull policies, in any case."""


_LOG_LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "critical": "CRITICAL",
}


def _log_level(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in _LOG_LEVELS:
        return _LOG_LEVELS[value.strip().lower()]
    raise ValueError("must be one of debug, info, warn (or warning), error, critical, in any case")


LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_log_level)
]
"""``LOG_LEVEL``: ``debug``, ``info``, ``warn``, ``error`` as in the seed guide, also
``warning`` and ``critical``, in any case; kept as the :mod:`logging` level's name
(``warn`` becomes ``WARNING``), which ``logging`` and uvicorn both take."""


class StreamSpaceSettings(BaseSettings):
    """Base of every settings model: unknown keyword arguments are typos, so they fail."""

    model_config = SettingsConfigDict(
        extra="forbid", case_sensitive=False, env_ignore_empty=True, frozen=True
    )


class PluginSettings(StreamSpaceSettings):
    """Which hook plugins load, and whether their calls are logged."""

    streamspace_load_plugins: str | None = None
    """Comma-separated hook plugin names to load; unset loads all, empty loads none."""

    streamspace_trace_hooks: bool = False
    """Log every hook call and its result at DEBUG level."""

    model_config = SettingsConfigDict(env_ignore_empty=False)

    def plugin_names(self) -> list[str] | None:
        """Return the names to load, or ``None`` for all installed plugins."""
        if self.streamspace_load_plugins is None:
            return None
        return [n.strip() for n in self.streamspace_load_plugins.split(",") if n.strip()]


class AgentSettings(StreamSpaceSettings):
    """An agent process's settings; names as in the seed deployment guide."""

    agent_id: str
    """Unique agent identifier, e.g. ``k8s-prod-us-east-1``. Replicas of one HA agent share it."""

    control_plane_url: str
    """Where the agent dials out to: ``ws://`` or ``wss://`` (``http(s)://`` is accepted)."""

    agent_token: SecretStr | None = None
    """The token ``streamspace-controlplane create-agent-token`` printed for this agent."""

    platform: str = "process"
    """Name of the platform driver in ``streamspace.platforms``."""

    region: str = "default"
    """Region label used by the scheduler to match templates and requests."""

    namespace: str = "streamspace"
    """Namespace (Kubernetes) or prefix (other platforms) the sessions live in."""

    max_cpu: float | None = Field(default=None, gt=0)
    """CPU cores this agent may hand out to sessions; unset or 0 (the seed's default) means
    no limit."""

    max_memory: float | None = Field(default=None, gt=0)
    """Memory in GB this agent may hand out to sessions; unset or 0 means no limit."""

    max_sessions: int = Field(default=10, ge=0)
    """Concurrent sessions this agent accepts; 0 drains it (connected, taking no new
    session). Unlike the seed's 0, there is no "unlimited": platforms count sessions."""

    heartbeat_interval: Annotated[Duration, Field(gt=0)] = 10.0
    """Seconds between heartbeats. The seed's Go agent used 30 s, which equals the control
    plane's default heartbeat timeout and made agents flap; 10 s leaves two misses of room."""

    health_port: int = Field(default=8082, ge=0, le=65535)
    """Port of ``/health`` and ``/ready``; 0 turns the endpoints off."""

    health_host: str = "0.0.0.0"
    """Address the health endpoints listen on. All interfaces by default, because the
    kubelet probes the pod's IP; ``127.0.0.1`` keeps them private on a shared host."""

    log_level: LogLevel = "INFO"
    """Logging level of ``streamspace-agent run`` (as the control plane's ``LOG_LEVEL``)."""

    enable_ha: bool = False
    """Run a leader election so that only one replica with this ``AGENT_ID`` connects."""

    ha_backend: str | None = None
    """Lease driver in ``streamspace.leases`` (``file``, ``redis``, ``swarm``,
    ``kubernetes``, ``memory``). Unset, it is the seed guide's default: ``kubernetes`` (a
    Lease) with ``PLATFORM=kubernetes``, else ``file``; ``none`` when HA is off."""

    lease_duration: Duration = 15.0
    """Seconds a lease stays valid without renewal (client-go's LeaseDuration)."""

    renew_deadline: Duration = 10.0
    """Seconds a leader keeps trying to renew before it stops acting (client-go's RenewDeadline)."""

    retry_period: Duration = 2.0
    """Seconds between acquire or renew attempts (client-go's RetryPeriod)."""

    vnc_transport: str = "ws-mux"
    """Name of the VNC transport driver in ``streamspace.transports``."""

    ws_ping_interval: Annotated[Duration, Field(gt=0)] = 20.0
    """Seconds between WebSocket pings to the control plane; with ``WS_PING_TIMEOUT`` it
    bounds how long a dead control plane or a black-holed network goes unnoticed."""

    ws_ping_timeout: Annotated[Duration, Field(gt=0)] = 20.0
    """Seconds a ping may wait for its pong before the connection counts as dead."""

    @field_validator("max_cpu", "max_memory", mode="before")
    @classmethod
    def _zero_is_no_limit(cls, value: object) -> object:
        # The seed's manifests write MAX_CPU: "0" and MAX_MEMORY: "0" for "unlimited".
        try:
            zero = float(value) == 0  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return value  # the field's own check names what is wrong
        return None if zero else value

    @field_validator("agent_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(
                "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("control_plane_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        mapping = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
        if not sep or scheme.lower() not in mapping or not urlsplit(value).hostname:
            raise ValueError(f"{value!r} is not a ws://, wss://, http:// or https:// URL")
        return f"{mapping[scheme.lower()]}://{rest}"

    @property
    def default_ha_backend(self) -> str:
        """The lease driver used when ``HA_BACKEND`` is unset: ``kubernetes`` with
        ``PLATFORM=kubernetes`` (the seed's Kubernetes agent sets ``ENABLE_HA`` alone), else
        ``file`` (the seed's Docker agent default)."""
        return "kubernetes" if self.platform == "kubernetes" else "file"

    def lease_driver(self) -> str:
        """Return the lease driver to load: ``HA_BACKEND`` (or :attr:`default_ha_backend`
        when it is unset), or ``none`` when HA is off."""
        if not self.enable_ha:
            return "none"
        return self.ha_backend or self.default_ha_backend


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], /, **values: Any) -> S:
    """Build ``cls`` from the environment (and ``values``, which win).

    Raises:
        ConfigError: naming each variable that is missing or bad, and why.
    """
    try:
        return cls(**values)
    except ValidationError as exc:
        raise ConfigError(describe_errors(cls, exc)) from None


def driver_settings(cls: type[S], given: object, owner: str) -> S:
    """Return a driver's settings: ``given``, or ``cls`` read from the environment if it is
    ``None``. What drivers call first in their constructor.

    Raises:
        ConfigError: ``given`` is not a ``cls``, or a variable is missing or bad.
    """
    if given is None:
        return load_settings(cls)
    if not isinstance(given, cls):
        raise ConfigError(f"{owner} needs {cls.__qualname__}, not {type(given).__name__}")
    return given


def describe_errors(cls: type[BaseSettings], exc: ValidationError) -> str:
    """Turn a settings ``ValidationError`` into lines that name environment variables."""
    prefix = str(cls.model_config.get("env_prefix", "") or "")
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = (prefix + field).upper()
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required but not set"
        elif "input" in err and err["type"] != "extra_forbidden":
            shown = err["input"]
            secret = cls.model_fields.get(field)
            if secret is not None and "SecretStr" in str(secret.annotation):
                shown = "**********"
            if repr(shown) not in msg:
                msg = f"{msg} (got {shown!r})"
        lines.append(f"{var}: {msg}")
    return "; ".join(lines)
