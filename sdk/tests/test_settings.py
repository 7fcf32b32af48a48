"""Tests of settings: durations, the agent's environment, and errors that name the variable."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from streamspace_sdk.errors import ConfigError
from streamspace_sdk.settings import (
    AgentSettings,
    PluginSettings,
    load_settings,
    parse_duration,
)

TOKEN = "tok-5f3c9e1d-not-for-logs"
"""A token distinctive enough that finding it in text means it leaked."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every variable the settings read, so the host's environment cannot leak in."""
    for cls in (AgentSettings, PluginSettings):
        for name in cls.model_fields:
            monkeypatch.delenv(name.upper(), raising=False)
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Set the two variables an agent cannot start without."""
    monkeypatch.setenv("AGENT_ID", "k8s-prod-us-east-1")
    monkeypatch.setenv("CONTROL_PLANE_URL", "wss://cp.example.com/agent")
    return monkeypatch


# -- parse_duration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("15s", 15.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("2.5s", 2.5),
        ("10", 10.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("0.25", 0.25),
        (10, 10.0),
        (0, 0.0),
        (1.5, 1.5),
        (" 15S ", 15.0),
        ("1H30M", 5400.0),
        ("\t500MS\n", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    """Durations are seconds, a number with a unit, or several units summed."""
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "abc",
        "15x",
        "s",
        "15 s",
        "-1s",
        "-1",
        -1,
        -0.5,
        "1s2",
        "1.s",
        "1e3s",
        "nan",
        "inf",
        "-inf",
        "Infinity",
        float("nan"),
        float("inf"),
        True,
        False,
        None,
        [15],
        b"15s",
    ],
)
def test_parse_duration_refuses(value: object) -> None:
    """Anything else is a ValueError whose message shows the value."""
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


def test_parse_duration_refuses_an_int_too_large_for_a_float() -> None:
    """An int beyond float range is a ValueError, like every other bad duration.

    Fails today: ``float(10**400)`` raises ``OverflowError``, which pydantic does not turn
    into a validation error, so ``load_settings`` lets it escape instead of a ConfigError.
    """
    with pytest.raises(ValueError, match="duration"):
        parse_duration(10**400)


def test_load_settings_huge_duration_is_config_error(agent_env: pytest.MonkeyPatch) -> None:
    """The same through load_settings: a ConfigError naming the variable, not OverflowError.

    Fails today, for the reason above.
    """
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL"):
        load_settings(AgentSettings, heartbeat_interval=10**400)


units = st.sampled_from([("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)])


@settings(max_examples=100)
@given(parts=st.lists(st.tuples(st.integers(0, 10_000), units), min_size=1, max_size=4))
def test_parse_duration_sums_units(parts: list[tuple[int, tuple[str, float]]]) -> None:
    """A duration written as several number-unit parts is the sum of the parts."""
    text = "".join(f"{n}{unit}" for n, (unit, _) in parts)
    expected = sum(n * factor for n, (_, factor) in parts)
    assert parse_duration(text) == pytest.approx(expected)


@settings(max_examples=100)
@given(seconds=st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_parse_duration_accepts_plain_seconds(seconds: float) -> None:
    """A number, or its text, is that many seconds."""
    assert parse_duration(seconds) == seconds
    assert parse_duration(repr(seconds)) == seconds


# -- AgentSettings -----------------------------------------------------------------------


def test_agent_defaults(agent_env: pytest.MonkeyPatch) -> None:
    """With only the required variables set, every other setting has its documented default."""
    s = load_settings(AgentSettings)
    assert s.agent_id == "k8s-prod-us-east-1"
    assert s.control_plane_url == "wss://cp.example.com/agent"
    assert s.agent_token is None
    assert s.platform == "process"
    assert s.region == "default"
    assert s.namespace == "streamspace"
    assert s.heartbeat_interval == 10.0
    assert (s.lease_duration, s.renew_deadline, s.retry_period) == (15.0, 10.0, 2.0)
    assert s.health_port == 8082
    assert s.max_sessions == 10
    assert s.max_cpu is None
    assert s.max_memory is None
    assert s.vnc_transport == "ws-mux"
    assert s.enable_ha is False
    assert s.ha_backend is None
    assert s.lease_driver() == "none"


@pytest.mark.parametrize(
    ("var", "value", "field", "seconds"),
    [
        ("LEASE_DURATION", "30s", "lease_duration", 30.0),
        ("RENEW_DEADLINE", "7500ms", "renew_deadline", 7.5),
        ("RETRY_PERIOD", "1", "retry_period", 1.0),
        ("HEARTBEAT_INTERVAL", "1m", "heartbeat_interval", 60.0),
        ("heartbeat_interval", "5s", "heartbeat_interval", 5.0),
    ],
)
def test_agent_durations_from_env(
    agent_env: pytest.MonkeyPatch, var: str, value: str, field: str, seconds: float
) -> None:
    """Duration variables take ``15s``-style values (variable names are case-insensitive)."""
    agent_env.setenv(var, value)
    assert getattr(load_settings(AgentSettings), field) == seconds


@pytest.mark.parametrize(
    "var", ["HEARTBEAT_INTERVAL", "LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD"]
)
def test_agent_bad_duration_names_the_variable(agent_env: pytest.MonkeyPatch, var: str) -> None:
    """A bad duration fails at start-up, naming the variable and showing the value."""
    agent_env.setenv(var, "abc")
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    assert var in str(info.value)
    assert "abc" in str(info.value)


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("debug", "DEBUG"),
        ("info", "INFO"),
        ("warn", "WARNING"),
        ("error", "ERROR"),
        ("critical", "CRITICAL"),
        ("WARN", "WARNING"),
        ("warning", "WARNING"),
        ("Warning", "WARNING"),
        (" Info ", "INFO"),
        ("DEBUG", "DEBUG"),
    ],
)
def test_agent_log_level_takes_the_seeds_values(
    agent_env: pytest.MonkeyPatch, value: str, level: str
) -> None:
    """LOG_LEVEL takes the seed's ``debug, info, warn, error`` and ``critical``, in any case,
    and holds the :mod:`logging` level's name, which ``logging`` takes as it is."""
    agent_env.setenv("LOG_LEVEL", value)
    s = load_settings(AgentSettings)
    assert s.log_level == level
    assert isinstance(logging.getLevelName(s.log_level), int)


@pytest.mark.parametrize("value", ["LOUD", "trace", "verbose", "10"])
def test_agent_bad_log_level_names_the_variable_and_the_values(
    agent_env: pytest.MonkeyPatch, value: str
) -> None:
    """A LOG_LEVEL that is no level fails at start-up naming the variable, the value and
    the levels allowed."""
    agent_env.setenv("LOG_LEVEL", value)
    with pytest.raises(ConfigError, match=r"^LOG_LEVEL: ") as info:
        load_settings(AgentSettings)
    message = str(info.value)
    assert repr(value) in message
    for allowed in ("debug", "info", "warn", "error", "critical"):
        assert allowed in message


def test_agent_missing_required_names_both() -> None:
    """Without AGENT_ID and CONTROL_PLANE_URL the error names both, in one message."""
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    message = str(info.value)
    assert "AGENT_ID" in message
    assert "CONTROL_PLANE_URL" in message
    assert "required" in message


def test_agent_empty_required_counts_as_missing(agent_env: pytest.MonkeyPatch) -> None:
    """An empty variable is treated as unset (``AGENT_ID=`` in a manifest is a mistake)."""
    agent_env.setenv("AGENT_ID", "")
    with pytest.raises(ConfigError, match="AGENT_ID: is required"):
        load_settings(AgentSettings)


def test_config_error_is_a_value_error() -> None:
    """ConfigError is also a ValueError, for callers that catch the builtin."""
    with pytest.raises(ValueError, match="AGENT_ID"):
        load_settings(AgentSettings)


@pytest.mark.parametrize(
    "agent_id", ["a", "A", "k8s-prod-us-east-1", "agent_1.eu", "0agent", "a" * 63]
)
def test_agent_good_ids(agent_env: pytest.MonkeyPatch, agent_id: str) -> None:
    """Ids of 1-63 letters, digits, ``.``, ``_`` and ``-``, starting alphanumeric, pass."""
    agent_env.setenv("AGENT_ID", agent_id)
    assert load_settings(AgentSettings).agent_id == agent_id


@pytest.mark.parametrize(
    "agent_id", ["bad id", "agent!", "-agent", ".agent", "_agent", "a" * 64, "agent/1", "agént"]
)
def test_agent_bad_ids(agent_env: pytest.MonkeyPatch, agent_id: str) -> None:
    """Other ids fail, naming AGENT_ID and showing the value."""
    agent_env.setenv("AGENT_ID", agent_id)
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    assert "AGENT_ID" in str(info.value)
    assert repr(agent_id) in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://cp:8000", "ws://cp:8000"),
        ("wss://cp.example.com/agent", "wss://cp.example.com/agent"),
        ("http://cp:8000", "ws://cp:8000"),
        ("https://cp.example.com/agent", "wss://cp.example.com/agent"),
        ("HTTPS://cp.example.com", "wss://cp.example.com"),
        ("WS://cp", "ws://cp"),
    ],
)
def test_agent_url_schemes(agent_env: pytest.MonkeyPatch, url: str, expected: str) -> None:
    """ws(s) URLs pass as they are; http(s) URLs become ws(s)."""
    agent_env.setenv("CONTROL_PLANE_URL", url)
    assert load_settings(AgentSettings).control_plane_url == expected


@pytest.mark.parametrize(
    "url", ["ftp://cp.example.com", "cp.example.com:8000", "ws://", "https:///", "file:///x"]
)
def test_agent_bad_urls(agent_env: pytest.MonkeyPatch, url: str) -> None:
    """Other schemes, or no host part, fail naming CONTROL_PLANE_URL."""
    agent_env.setenv("CONTROL_PLANE_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    assert "CONTROL_PLANE_URL" in str(info.value)
    assert url in str(info.value)


@pytest.mark.parametrize("url", ["ws:///agent", "https:///agent/", "wss://:8443/agent"])
def test_agent_url_needs_a_host(agent_env: pytest.MonkeyPatch, url: str) -> None:
    """A URL without a host fails at start-up, not at the first dial.

    Fails today: the check only asks that something follow ``://`` once slashes are
    stripped, so a path or a bare port passes.
    """
    agent_env.setenv("CONTROL_PLANE_URL", url)
    with pytest.raises(ConfigError, match="CONTROL_PLANE_URL"):
        load_settings(AgentSettings)


def test_agent_token_is_secret(agent_env: pytest.MonkeyPatch) -> None:
    """AGENT_TOKEN is a SecretStr: readable on purpose, redacted wherever settings are shown."""
    agent_env.setenv("AGENT_TOKEN", TOKEN)
    s = load_settings(AgentSettings)
    assert isinstance(s.agent_token, SecretStr)
    assert s.agent_token.get_secret_value() == TOKEN
    for shown in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump()), repr(s.agent_token)):
        assert TOKEN not in shown


def test_agent_token_not_in_errors(agent_env: pytest.MonkeyPatch) -> None:
    """When start-up fails, the error names the bad variables but never shows the token."""
    agent_env.setenv("AGENT_TOKEN", TOKEN)
    agent_env.setenv("MAX_SESSIONS", "lots")
    agent_env.setenv("AGENT_ID", "bad id")
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    assert "MAX_SESSIONS" in str(info.value)
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value)


def test_agent_bad_token_value_is_redacted(agent_env: pytest.MonkeyPatch) -> None:
    """Even a token of the wrong type is not shown in the error."""
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings, agent_token=[TOKEN])
    assert "AGENT_TOKEN" in str(info.value)
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_agent_bad_max_sessions(agent_env: pytest.MonkeyPatch, value: str) -> None:
    """MAX_SESSIONS must be a whole number of zero or more."""
    agent_env.setenv("MAX_SESSIONS", value)
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    assert "MAX_SESSIONS" in str(info.value)
    assert repr(value) in str(info.value)


def test_agent_zero_max_sessions_is_allowed(agent_env: pytest.MonkeyPatch) -> None:
    """MAX_SESSIONS=0 drains an agent: it stays connected but takes no new sessions."""
    agent_env.setenv("MAX_SESSIONS", "0")
    assert load_settings(AgentSettings).max_sessions == 0


@pytest.mark.parametrize("zero", ["0", "0.0", " 0 ", "0.00"])
def test_agent_zero_cpu_and_memory_are_no_limit(agent_env: pytest.MonkeyPatch, zero: str) -> None:
    """The seed's manifests set MAX_CPU and MAX_MEMORY to 0 for "unlimited"."""
    agent_env.setenv("MAX_CPU", zero)
    agent_env.setenv("MAX_MEMORY", zero)
    settings = load_settings(AgentSettings)
    assert (settings.max_cpu, settings.max_memory) == (None, None)


def test_load_settings_refuses_unknown_keywords(agent_env: pytest.MonkeyPatch) -> None:
    """A keyword that is not a setting is a typo, and fails naming it (extra=forbid)."""
    with pytest.raises(ConfigError, match="HEARTBEAT_INTREVAL"):
        load_settings(AgentSettings, heartbeat_intreval="5s")


def test_load_settings_keywords_win_over_env(agent_env: pytest.MonkeyPatch) -> None:
    """Keyword values override the environment."""
    agent_env.setenv("MAX_SESSIONS", "3")
    s = load_settings(AgentSettings, max_sessions=7, heartbeat_interval="2s")
    assert (s.max_sessions, s.heartbeat_interval) == (7, 2.0)


def test_agent_settings_are_frozen(agent_env: pytest.MonkeyPatch) -> None:
    """Settings cannot change after start-up."""
    s = load_settings(AgentSettings)
    with pytest.raises(ValidationError, match="frozen"):
        s.max_sessions = 3  # type: ignore[misc]


@pytest.mark.parametrize("backend", [None, ""])
@pytest.mark.parametrize(
    ("platform", "default"),
    [(None, "file"), ("docker", "file"), ("process", "file"), ("kubernetes", "kubernetes")],
)
def test_ha_without_backend_takes_the_seeds_default(
    agent_env: pytest.MonkeyPatch, backend: str | None, platform: str | None, default: str
) -> None:
    """ENABLE_HA=true with HA_BACKEND unset (or empty) uses the seed's default: the
    Kubernetes Lease with PLATFORM=kubernetes (its manifest sets ENABLE_HA alone), else
    ``file`` (its Docker agent table)."""
    agent_env.setenv("ENABLE_HA", "true")
    if backend is not None:
        agent_env.setenv("HA_BACKEND", backend)
    if platform is not None:
        agent_env.setenv("PLATFORM", platform)
    s = load_settings(AgentSettings)
    assert s.enable_ha is True
    assert s.ha_backend is None
    assert s.default_ha_backend == default
    assert s.lease_driver() == default


def test_ha_backend_wins_over_the_default(agent_env: pytest.MonkeyPatch) -> None:
    """A HA_BACKEND that is set is used whatever the platform."""
    agent_env.setenv("ENABLE_HA", "true")
    agent_env.setenv("PLATFORM", "kubernetes")
    agent_env.setenv("HA_BACKEND", "redis")
    assert load_settings(AgentSettings).lease_driver() == "redis"


def test_ha_with_backend(agent_env: pytest.MonkeyPatch) -> None:
    """With HA on, the lease driver is HA_BACKEND."""
    agent_env.setenv("ENABLE_HA", "true")
    agent_env.setenv("HA_BACKEND", "redis")
    assert load_settings(AgentSettings).lease_driver() == "redis"


def test_ha_off_ignores_backend(agent_env: pytest.MonkeyPatch) -> None:
    """With HA off, the lease driver is ``none`` whatever HA_BACKEND says."""
    agent_env.setenv("ENABLE_HA", "false")
    agent_env.setenv("HA_BACKEND", "redis")
    assert load_settings(AgentSettings).lease_driver() == "none"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("1", True),
        ("false", False),
        ("no", False),
        ("off", False),
        ("0", False),
    ],
)
def test_enable_ha_parsing(agent_env: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    """ENABLE_HA takes the usual spellings of yes and no."""
    agent_env.setenv("ENABLE_HA", value)
    assert load_settings(AgentSettings).enable_ha is expected


def test_enable_ha_bad_value(agent_env: pytest.MonkeyPatch) -> None:
    """Anything else fails naming ENABLE_HA and showing the value."""
    agent_env.setenv("ENABLE_HA", "maybe")
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    assert "ENABLE_HA" in str(info.value)
    assert "maybe" in str(info.value)


@pytest.mark.parametrize(
    ("var", "value"), [("MAX_CPU", "-0.5"), ("MAX_MEMORY", "-2"), ("MAX_CPU", "lots")]
)
def test_agent_limits_must_be_positive(agent_env: pytest.MonkeyPatch, var: str, value: str) -> None:
    """MAX_CPU and MAX_MEMORY are unset, 0 (no limit) or positive."""
    agent_env.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        load_settings(AgentSettings)


@pytest.mark.parametrize("value", ["-1", "65536", "http"])
def test_agent_bad_health_port(agent_env: pytest.MonkeyPatch, value: str) -> None:
    """HEALTH_PORT is 0..65535."""
    agent_env.setenv("HEALTH_PORT", value)
    with pytest.raises(ConfigError, match="HEALTH_PORT"):
        load_settings(AgentSettings)


def test_every_error_is_reported_at_once(agent_env: pytest.MonkeyPatch) -> None:
    """Several bad variables are all named in one error, so one restart fixes them all."""
    agent_env.setenv("HEARTBEAT_INTERVAL", "soon")
    agent_env.setenv("MAX_SESSIONS", "-1")
    agent_env.setenv("HEALTH_PORT", "99999")
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    for var in ("HEARTBEAT_INTERVAL", "MAX_SESSIONS", "HEALTH_PORT"):
        assert var in str(info.value)


# -- PluginSettings ----------------------------------------------------------------------


def test_plugin_names_unset_loads_all() -> None:
    """STREAMSPACE_LOAD_PLUGINS unset means every installed plugin."""
    assert load_settings(PluginSettings).plugin_names() is None


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("", []),
        (" , ", []),
        ("a", ["a"]),
        ("a, b,", ["a", "b"]),
        (" audit ,quota", ["audit", "quota"]),
    ],
)
def test_plugin_names(monkeypatch: pytest.MonkeyPatch, value: str, names: list[str]) -> None:
    """A set variable lists the plugins to load; empty loads none."""
    monkeypatch.setenv("STREAMSPACE_LOAD_PLUGINS", value)
    assert load_settings(PluginSettings).plugin_names() == names


def test_trace_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAMSPACE_TRACE_HOOKS turns hook tracing on; it is off by default."""
    assert load_settings(PluginSettings).streamspace_trace_hooks is False
    monkeypatch.setenv("STREAMSPACE_TRACE_HOOKS", "1")
    assert load_settings(PluginSettings).streamspace_trace_hooks is True


def test_plugin_settings_refuse_unknown_keywords() -> None:
    """PluginSettings keeps extra=forbid from the base even though it overrides its config."""
    with pytest.raises(ConfigError, match="STREAMSPACE_LOAD_PLUGIN"):
        load_settings(PluginSettings, streamspace_load_plugin="a")


def test_driver_settings_reads_the_environment_or_checks_the_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamspace_sdk.platforms.process import ProcessPlatform
    from streamspace_sdk.settings import driver_settings

    monkeypatch.setenv("MAX_SESSIONS", "3")
    read = driver_settings(ProcessPlatform.Settings, None, "ProcessPlatform")
    assert read.max_sessions == 3
    given = ProcessPlatform.Settings(max_sessions=5)
    assert driver_settings(ProcessPlatform.Settings, given, "ProcessPlatform") is given
    with pytest.raises(ConfigError, match=r"ProcessPlatform needs ProcessPlatform\.Settings, not"):
        driver_settings(
            ProcessPlatform.Settings,
            AgentSettings(agent_id="a", control_plane_url="ws://x"),
            "ProcessPlatform",
        )
    monkeypatch.setenv("MAX_SESSIONS", "many")
    with pytest.raises(ConfigError, match="MAX_SESSIONS"):
        driver_settings(ProcessPlatform.Settings, None, "ProcessPlatform")
