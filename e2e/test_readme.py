"""The root README's promise: `streamspace up`, then its REST example starts a desktop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rest_example() -> str:
    text = README.read_text()
    section = text[text.index("### Start a desktop from the REST API") :]
    return re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL).group(1)  # type: ignore[union-attr]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[int, dict[str, str], subprocess.Popen[str]]]:
    """`streamspace up` as a user runs it, with HOME in a temporary folder."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMSPACE_", "DB_"))}
    env |= {"HOME": str(tmp_path), "STREAMSPACE_LOAD_PLUGINS": ""}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("streamspace")), "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # the banner is what we wait for
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C stops it."):
            break
    banner = "".join(lines)
    assert f"StreamSpace is up: http://127.0.0.1:{port}" in banner, banner
    assert "admin password:" in banner
    try:
        yield port, env, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_readme_rest_example_starts_a_desktop(stack, tmp_path: Path):
    port, env, proc = stack
    for tool in ("curl", "jq"):
        assert shutil.which(tool), f"the README example needs {tool}"
    script = rest_example().replace("8080", str(port))
    run = subprocess.run(
        ["bash", "-eu", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert '"state":"running"' in run.stdout
    assert '"state": "running"' in run.stdout  # the final `jq .` of the session
    assert '"agent_id": "local"' in run.stdout

    state_dir = tmp_path / ".streamspace" / "process" / "sessions"
    assert list(state_dir.glob("*.json")), "the process platform recorded no session"

    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert not list(state_dir.glob("*.json")), "a session outlived `streamspace up`"
