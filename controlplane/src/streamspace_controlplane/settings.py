"""The control plane's settings, with the seed guide's variable names.

This is the only module of the control plane that reads the environment or the disk for
configuration. A bad value fails at start-up naming the variable.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from streamspace_sdk.errors import ConfigError
from streamspace_sdk.settings import Duration, LogLevel, StreamSpaceSettings, load_settings

__all__ = ["MIN_JWT_SECRET_CHARS", "ControlPlaneSettings", "load_settings"]

MIN_JWT_SECRET_CHARS = 32
"""HS256 keys shorter than the hash are guessable; the seed's `openssl rand -base64 32` is 44."""


def _generated_pod_name() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class ControlPlaneSettings(StreamSpaceSettings):
    """One control-plane process's settings."""

    model_config = SettingsConfigDict(env_ignore_empty=True)

    db_host: str | None = None
    """PostgreSQL host; unset means the embedded SQLite store under ``STREAMSPACE_HOME``."""
    db_port: int = Field(default=5432, ge=1, le=65535)
    """PostgreSQL port."""
    db_name: str = "streamspace"
    """PostgreSQL database."""
    db_user: str = "streamspace"
    """PostgreSQL user."""
    db_password: SecretStr | None = None
    """PostgreSQL password."""
    db_driver: str | None = None
    """Store driver in ``streamspace.stores``: ``postgres`` with DB_HOST, else ``sqlite``."""
    database_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    """Longest one PostgreSQL statement, or the wait for a pooled connection, may take
    before the request fails with 503: a database that stops answering (a dead host, a
    lost route) must not hold requests forever. Ten seconds is far beyond any of the
    store's queries, and below the usual 30 s or 60 s of a proxy in front."""

    jwt_secret: SecretStr | None = None
    """HS256 key for user tokens; at least 32 characters. Generated and kept on SQLite."""
    jwt_ttl: Duration = 12 * 3600.0
    """How long a login token is valid."""

    port: int = Field(default=8080, ge=0, le=65535)
    """HTTP port (0 picks a free one)."""
    host: str = "0.0.0.0"
    """Address to listen on."""
    log_level: LogLevel = "INFO"
    """Logging level: ``debug``, ``info``, ``warn``, ``error`` (the seed's) or ``critical``,
    in any case; held as the level's upper-case name."""

    agent_heartbeat_timeout: Annotated[Duration, Field(gt=0)] = 30.0
    """An agent silent this long is marked offline."""
    vnc_proxy_timeout: Annotated[Duration, Field(gt=0)] = 300.0
    """A VNC stream idle this long is closed."""
    ws_ping_interval: Annotated[Duration, Field(gt=0)] = 20.0
    """Seconds between WebSocket pings to agents and viewers (uvicorn's)."""
    ws_ping_timeout: Annotated[Duration, Field(gt=0)] = 20.0
    """Seconds a ping may wait for its pong before the socket counts as dead."""
    http_keepalive_timeout: Annotated[Duration, Field(gt=0)] = 75.0
    """Seconds an idle HTTP connection stays open. Longer than the idle timeout of the
    proxies and clients in front (60 s for most ingresses and load balancers, 5 s for
    httpx), so they close an idle connection first and never send a request on one the
    server is closing at that moment (a reset for the client, a 502 from a proxy)."""
    redis_url: SecretStr | None = None
    """Redis for the ``redis`` hub (several replicas): ``redis://`` or ``rediss://``."""
    agent_hub_backend: str = "memory"
    """Hub driver in ``streamspace.hubs``: ``memory`` (one process) or ``redis``."""
    redis_key_prefix: str = ""
    """Prefix of the ``redis`` hub's keys, for control planes sharing one Redis."""
    pod_name: str = Field(default_factory=lambda: _generated_pod_name(), min_length=1)
    """This replica's id among several (Kubernetes: the pod's name); when unset, the host
    name and a random suffix."""
    pod_ip: str | None = None
    """The address other replicas reach this one at, on ``PORT`` (Kubernetes: the pod IP)."""
    internal_url: str | None = None
    """Base URL other replicas reach this one at (``http://10.1.2.3:8080``); default from
    ``POD_IP`` and ``PORT``."""
    replica_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    """With several replicas: one silent this long is dead (its entries go, and another
    takes over its leadership)."""

    streamspace_home: Path = Path("~/.streamspace")
    """Where the SQLite database, the generated JWT secret and admin password live."""
    admin_username: str = "admin"
    """The bootstrap admin's name."""
    admin_password: SecretStr | None = None
    """The bootstrap admin's password; generated, printed once and kept when unset."""
    templates_file: Path | None = None
    """YAML file of templates loaded (created or updated) at start."""
    max_sessions_per_user: int = Field(default=5, ge=0)
    """Sessions a user may hold that are not stopped; more is answered with 429."""
    max_concurrent_starts: int = Field(default=100, ge=0)
    """Sessions being started at once (pending, scheduled or starting); a creation past it
    is answered with 429 and ``Retry-After``. 0: no limit."""

    command_ack_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    """A sent command not acknowledged in this time is sent again (with backoff)."""
    command_expiry: Annotated[Duration, Field(gt=0)] = 600.0
    """A command not completed in this time is expired and its session marked failed."""
    lost_grace_period: Annotated[Duration, Field(ge=0)] = 60.0
    """Sessions of an agent offline this long become ``lost``."""
    reconcile_interval: Annotated[Duration, Field(gt=0)] = 5.0
    """How often the reconciler and scheduler run, besides on every registration."""
    login_attempts: int = Field(default=5, ge=1)
    """Failed logins allowed per user and address in ``login_window`` before 429."""
    login_window: Annotated[Duration, Field(gt=0)] = 300.0
    """Window of the failed-login throttle."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Extra ``Origin`` values accepted on browser WebSockets (same origin always is)."""

    @field_validator("streamspace_home")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("internal_url")
    @classmethod
    def _check_internal_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")

    def replica_url(self) -> str:
        """Return the base URL other replicas reach this one at.

        Raises:
            ConfigError: neither ``INTERNAL_URL`` nor ``POD_IP`` is set and ``PORT`` is 0, so
                no address can be told to the other replicas.
        """
        if self.internal_url:
            return self.internal_url
        if self.port == 0:
            raise ConfigError(
                "INTERNAL_URL: is required with PORT=0, so other replicas can reach this one"
            )
        host = self.pod_ip or socket.gethostbyname(socket.gethostname())
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def store_driver(self) -> str:
        """The store driver to load."""
        if self.db_driver:
            return self.db_driver
        return "postgres" if self.db_host else "sqlite"

    @property
    def sqlite_path(self) -> Path:
        """The embedded database file."""
        return self.streamspace_home / "streamspace.db"

    def postgres_dsn(self) -> str:
        """Return the asyncpg DSN built from the ``DB_*`` variables."""
        if not self.db_host:
            raise ConfigError("DB_HOST: is required for the postgres store")
        password = self.db_password.get_secret_value() if self.db_password else ""
        auth = quote(self.db_user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@{self.db_host}:{self.db_port}/{self.db_name}"

    def resolve_jwt_secret(self) -> str:
        """Return the JWT key: the configured one, or on SQLite one generated and kept.

        Raises:
            ConfigError: on PostgreSQL without a ``JWT_SECRET`` of at least 32 characters,
                because replicas must share it and a short key is guessable.
        """
        if self.jwt_secret is not None:
            secret = self.jwt_secret.get_secret_value()
            if len(secret) < MIN_JWT_SECRET_CHARS:
                raise ConfigError(
                    f"JWT_SECRET: must be at least {MIN_JWT_SECRET_CHARS} characters "
                    f"(got {len(secret)}); generate one with `openssl rand -base64 32`"
                )
            return secret
        if self.store_driver != "sqlite":
            raise ConfigError(
                "JWT_SECRET: is required with PostgreSQL (replicas must share it); "
                "generate one with `openssl rand -base64 32`"
            )
        return read_or_create_secret(self.streamspace_home / "jwt-secret")


def read_or_create_secret(path: Path) -> str:
    """Return the secret kept in ``path``, creating it (mode 0600) on first use."""
    if path.exists():
        secret = path.read_text().strip()
        if len(secret) >= MIN_JWT_SECRET_CHARS:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret
