"""ControlPlaneSettings: the seed's variable names, the JWT secret rules, store selection."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamspace_controlplane.settings import (
    MIN_JWT_SECRET_CHARS,
    ControlPlaneSettings,
    load_settings,
)
from streamspace_controlplane.store.postgres import PostgresStore
from streamspace_sdk.errors import ConfigError


def test_defaults_follow_the_seed(tmp_path: Path) -> None:
    settings = ControlPlaneSettings(streamspace_home=tmp_path)
    assert settings.port == 8080
    assert settings.agent_heartbeat_timeout == 30.0
    assert settings.vnc_proxy_timeout == 300.0
    assert settings.agent_hub_backend == "memory"
    assert settings.max_sessions_per_user == 5
    assert settings.admin_username == "admin"
    assert settings.store_driver == "sqlite"


def test_environment_uses_the_seed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9090")
    monkeypatch.setenv("AGENT_HEARTBEAT_TIMEOUT", "45s")
    monkeypatch.setenv("VNC_PROXY_TIMEOUT", "10m")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MAX_SESSIONS_PER_USER", "2")
    monkeypatch.setenv("LOGIN_WINDOW", "1m")
    settings = load_settings(ControlPlaneSettings)
    assert settings.port == 9090
    assert settings.agent_heartbeat_timeout == 45.0
    assert settings.vnc_proxy_timeout == 600.0
    assert settings.log_level == "DEBUG"
    assert settings.max_sessions_per_user == 2
    assert settings.login_window == 60.0


def test_sqlite_path_is_under_streamspace_home(tmp_path: Path) -> None:
    settings = ControlPlaneSettings(streamspace_home=tmp_path / "ss")
    assert settings.sqlite_path == tmp_path / "ss" / "streamspace.db"


def test_streamspace_home_expands_the_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = ControlPlaneSettings(streamspace_home=Path("~/.streamspace"))
    assert settings.streamspace_home == tmp_path / ".streamspace"


def test_db_host_selects_postgres_and_db_driver_wins(tmp_path: Path) -> None:
    assert ControlPlaneSettings(db_host="db").store_driver == "postgres"
    assert ControlPlaneSettings(db_host="db", db_driver="custom").store_driver == "custom"
    assert ControlPlaneSettings(db_driver="sqlite").store_driver == "sqlite"


def test_postgres_dsn_from_the_db_variables() -> None:
    settings = ControlPlaneSettings(
        db_host="db.example", db_port=6543, db_name="ss", db_user="u", db_password=SecretStr("p@ss")
    )
    assert settings.postgres_dsn() == "postgresql://u:p%40ss@db.example:6543/ss"
    no_password = ControlPlaneSettings(db_host="db.example")
    assert no_password.postgres_dsn() == "postgresql://streamspace@db.example:5432/streamspace"


def test_postgres_dsn_without_db_host_names_it() -> None:
    with pytest.raises(ConfigError, match="DB_HOST"):
        ControlPlaneSettings().postgres_dsn()


def test_configured_jwt_secret_is_used(tmp_path: Path) -> None:
    secret = "k" * MIN_JWT_SECRET_CHARS
    settings = ControlPlaneSettings(streamspace_home=tmp_path, jwt_secret=SecretStr(secret))
    assert settings.resolve_jwt_secret() == secret
    assert not (tmp_path / "jwt-secret").exists()


@pytest.mark.parametrize("db_host", [None, "db"])
def test_short_jwt_secret_is_refused_naming_the_variable(tmp_path: Path, db_host: str | None):
    settings = ControlPlaneSettings(
        streamspace_home=tmp_path, jwt_secret=SecretStr("short"), db_host=db_host
    )
    with pytest.raises(ConfigError, match=r"JWT_SECRET: must be at least 32 characters \(got 5\)"):
        settings.resolve_jwt_secret()


def test_missing_jwt_secret_on_sqlite_is_generated_and_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = ControlPlaneSettings(streamspace_home=home)
    first = settings.resolve_jwt_secret()
    assert len(first) >= MIN_JWT_SECRET_CHARS
    path = home / "jwt-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ControlPlaneSettings(streamspace_home=home).resolve_jwt_secret() == first


def test_a_short_kept_secret_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("tooshort\n")
    secret = ControlPlaneSettings(streamspace_home=tmp_path).resolve_jwt_secret()
    assert len(secret) >= MIN_JWT_SECRET_CHARS


def test_missing_jwt_secret_on_postgres_is_an_error(tmp_path: Path) -> None:
    settings = ControlPlaneSettings(streamspace_home=tmp_path, db_host="db")
    with pytest.raises(ConfigError, match="JWT_SECRET: is required with PostgreSQL"):
        settings.resolve_jwt_secret()


def test_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", "")
    monkeypatch.setenv("DB_HOST", "")
    settings = load_settings(ControlPlaneSettings)
    assert settings.jwt_secret is None
    assert settings.store_driver == "sqlite"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "not-a-port"),
        ("PORT", "70000"),
        ("DB_PORT", "0"),
        ("AGENT_HEARTBEAT_TIMEOUT", "soon"),
        ("AGENT_HEARTBEAT_TIMEOUT", "0s"),
        ("VNC_PROXY_TIMEOUT", "-5"),
        ("LOG_LEVEL", "LOUD"),
        ("MAX_SESSIONS_PER_USER", "-1"),
        ("LOGIN_ATTEMPTS", "0"),
        ("LOGIN_WINDOW", "0"),
        ("HTTP_KEEPALIVE_TIMEOUT", "0s"),
        ("JWT_TTL", "forever"),
    ],
)
def test_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"^{variable}: "):
        load_settings(ControlPlaneSettings)


@pytest.mark.parametrize(("value", "level"), [("warn", "WARNING"), ("debug", "DEBUG")])
def test_log_level_takes_the_seeds_values(
    monkeypatch: pytest.MonkeyPatch, value: str, level: str
) -> None:
    """The seed lists LOG_LEVEL as ``debug, info, warn, error``: the SDK's ``LogLevel``,
    tested in full there, takes them here too (``logging`` takes the upper-case name)."""
    monkeypatch.setenv("LOG_LEVEL", value)
    assert load_settings(ControlPlaneSettings).log_level == level


def test_a_bad_log_level_lists_the_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match=r"^LOG_LEVEL: ") as info:
        load_settings(ControlPlaneSettings)
    assert "'loud'" in str(info.value)
    for allowed in ("debug", "info", "warn", "error", "critical"):
        assert allowed in str(info.value)


def test_a_typo_in_keyword_settings_fails() -> None:
    with pytest.raises(ConfigError, match="JWT_SECRETS"):
        load_settings(ControlPlaneSettings, jwt_secrets="x" * 40)


def test_secrets_are_redacted(tmp_path: Path) -> None:
    settings = ControlPlaneSettings(
        streamspace_home=tmp_path,
        jwt_secret=SecretStr("j" * 40),
        admin_password=SecretStr("hunter2hunter2"),
        db_password=SecretStr("dbpass-secret"),
    )
    shown = repr(settings) + str(settings.model_dump())
    for secret in ("j" * 40, "hunter2hunter2", "dbpass-secret"):
        assert secret not in shown


def test_database_timeout_bounds_the_postgres_store(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PostgresStore("postgresql://u@db/x").timeout_s == 10.0
    monkeypatch.setenv("DB_HOST", "db")
    monkeypatch.setenv("DATABASE_TIMEOUT", "250ms")
    assert PostgresStore(settings=load_settings(ControlPlaneSettings)).timeout_s == 0.25
    monkeypatch.setenv("DATABASE_TIMEOUT", "0s")
    with pytest.raises(ConfigError, match="DATABASE_TIMEOUT"):
        load_settings(ControlPlaneSettings)
