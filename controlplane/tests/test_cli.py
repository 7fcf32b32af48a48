"""``streamspace-controlplane``: every command, run the way an operator runs it."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from streamspace_controlplane.app import build_control_plane
from streamspace_controlplane.cli import main, server_config
from streamspace_controlplane.settings import ControlPlaneSettings, load_settings
from streamspace_controlplane.store._sql import load_migrations
from streamspace_controlplane.store.sqlite import SqliteStore


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in list(os.environ):
        if var.startswith(("DB_", "JWT_", "ADMIN_", "STREAMSPACE_", "AGENT_HUB")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("STREAMSPACE_HOME", str(tmp_path))
    monkeypatch.setenv("STREAMSPACE_LOAD_PLUGINS", "")
    return tmp_path


async def stored_users(home: Path) -> dict[str, str]:
    store = SqliteStore(settings=ControlPlaneSettings(streamspace_home=home))
    await store.connect()
    try:
        return {u.username: u.role for u in await store.list_users()}
    finally:
        await store.close()


def test_migrate_then_again_is_a_no_op(home: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["migrate"]) == 0
    first = capsys.readouterr().out
    latest = load_migrations("sqlite")[-1].version
    assert f"schema version {latest}" in first
    assert main(["migrate"]) == 0
    assert "applied nothing" in capsys.readouterr().out
    assert (home / "streamspace.db").exists()


def test_create_user_reads_the_password_from_stdin(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-password\n"))
    assert main(["create-user", "carol", "--admin", "--password-stdin"]) == 0
    assert "created admin carol" in capsys.readouterr().out
    assert asyncio.run(stored_users(home))["carol"] == "admin"


def test_create_user_refuses_a_short_password(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["create-user", "dave", "--password-stdin"]) == 2
    assert "error:" in capsys.readouterr().err
    assert "dave" not in asyncio.run(stored_users(home))


def test_create_agent_token_prints_it_once_and_stores_only_a_hash(
    home: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["create-agent-token", "docker-host-01"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("ssa_")
    assert "docker-host-01" in err
    assert "shown once" in err
    assert token.encode() not in (home / "streamspace.db").read_bytes()


def test_plugins_lists_stores_and_hubs(home: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("streamspace.stores", "sqlite", "postgres", "streamspace.hubs", "memory"):
        assert name in out


def test_bad_setting_is_an_error_naming_the_variable(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("AGENT_HEARTBEAT_TIMEOUT", "soon")
    assert main(["migrate"]) == 2
    assert "AGENT_HEARTBEAT_TIMEOUT" in capsys.readouterr().err


def test_postgres_without_jwt_secret_refuses_to_start(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("DB_HOST", "127.0.0.1")
    assert main(["migrate"]) == 2
    assert "JWT_SECRET" in capsys.readouterr().err


def test_serve_answers_health_and_stops_on_sigterm(home: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamspace_controlplane.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = None
        for _ in range(300):
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None:
                    break
                # another process: nothing to await but its port
                asyncio.run(asyncio.sleep(0.1))
        assert ready is not None, proc.communicate(timeout=5)[0].decode()
        assert ready.status_code == 200, ready.text
        assert (home / "admin-password").stat().st_mode & 0o777 == 0o600
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells it.
    assert proc.returncode in (0, -15), output
    assert "Traceback" not in output, output


@pytest.mark.parametrize(("value", "seconds"), [(None, 75), ("90s", 90), ("2m", 120)])
def test_serve_keeps_idle_http_connections_past_the_proxies_idle_timeout(
    home: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, seconds: int
) -> None:
    """Past 60 s (ingresses, load balancers) by default, so they close an idle connection
    first and never send a request on one uvicorn is closing."""
    if value is not None:
        monkeypatch.setenv("HTTP_KEEPALIVE_TIMEOUT", value)
    cp = build_control_plane(load_settings(ControlPlaneSettings))
    assert server_config(cp).timeout_keep_alive == seconds
