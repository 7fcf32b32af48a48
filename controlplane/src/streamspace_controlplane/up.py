"""``streamspace up``: a control plane and an agent in one process, with zero set-up.

SQLite and the generated secrets live in ``STREAMSPACE_HOME`` (``~/.streamspace``); the agent
runs sessions with the ``process`` platform (TigerVNC ``Xvnc`` and ``xterm``). It creates the
agent's token itself, seeds a ``desktop`` template, prints the URL and the admin credentials,
and Ctrl-C stops both cleanly, and the sessions with them: nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence

import uvicorn
from pydantic import SecretStr

from streamspace_controlplane import auth
from streamspace_controlplane.app import build_control_plane
from streamspace_controlplane.cli import server_config
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import ACTIVE_STATES, Template
from streamspace_controlplane.services import agents as agent_service
from streamspace_controlplane.settings import ControlPlaneSettings, load_settings
from streamspace_sdk.agent import Agent
from streamspace_sdk.errors import StreamSpaceError
from streamspace_sdk.platforms.process import ProcessPlatform
from streamspace_sdk.settings import AgentSettings

__all__ = ["main", "up"]

logger = logging.getLogger("streamspace.up")

AGENT_ID = "local"
TEMPLATE = Template(
    name="desktop",
    display_name="Desktop",
    description="An xterm on a TigerVNC X server, run as a local process.",
    platform="process",
)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``up`` stops the agent first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _agent_token(cp: ControlPlane) -> str:
    """Reuse the token kept in ``STREAMSPACE_HOME/agent-token`` if it still works."""
    path = cp.settings.streamspace_home / "agent-token"
    if path.exists():
        token = path.read_text().strip()
        with contextlib.suppress(StreamSpaceError):
            await auth.authenticate_agent(cp, token)
            return token
    token, _record = await agent_service.create_token(cp, AGENT_ID, actor="streamspace up")
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def _admin_password(cp: ControlPlane) -> str:
    if cp.settings.admin_password is not None:
        return "(from ADMIN_PASSWORD)"
    path = cp.settings.streamspace_home / "admin-password"
    return path.read_text().strip() if path.exists() else "(unknown: set ADMIN_PASSWORD)"


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    while not server.started:
        if task.done():
            task.result()
            raise StreamSpaceError("the control plane stopped while starting")
        await asyncio.sleep(0.05)  # uvicorn sets a flag; it offers nothing to await


async def _stop_sessions(cp: ControlPlane, platform: ProcessPlatform) -> None:
    """Stop what this agent runs and record it, so nothing outlives ``up``."""
    for status in await platform.list_sessions():
        with contextlib.suppress(StreamSpaceError):
            await platform.stop(status.session_id, status.generation + 1)
    sessions, _total = await cp.store.list_sessions(
        agent_id=AGENT_ID, states=sorted(ACTIVE_STATES), limit=10_000
    )
    for session in sessions:
        await cp.events.transition(
            session, "stopped", "stopped when `streamspace up` exited", desired_state="stopped"
        )


async def up(settings: ControlPlaneSettings) -> None:
    """Run the control plane and a ``process`` agent until SIGINT or SIGTERM."""
    cp = build_control_plane(settings)
    config = server_config(cp)
    server = _Server(config)
    serving = asyncio.create_task(server.serve(), name="control plane")
    await _wait_started(server, serving)

    if await cp.store.get_template(TEMPLATE.name) is None:
        await cp.store.create_template(TEMPLATE)
    home = settings.streamspace_home
    platform = ProcessPlatform(
        ProcessPlatform.Settings(process_state_dir=home / "process"), agent_id=AGENT_ID
    )
    try:
        await platform.check()
    except StreamSpaceError as exc:
        logger.warning("Sessions cannot start until this is fixed: %s", exc)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
    agent = Agent(
        AgentSettings(
            agent_id=AGENT_ID,
            control_plane_url=f"ws://127.0.0.1:{port}",
            agent_token=SecretStr(await _agent_token(cp)),
            platform="process",
            health_port=0,
            log_level=settings.log_level,
        ),
        platform,
    )
    running = asyncio.create_task(agent.serve(), name="agent")
    shown = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
    print(
        f"\nStreamSpace is up: http://{shown}:{port}\n"
        f"  admin user:     {settings.admin_username}\n"
        f"  admin password: {_admin_password(cp)}\n"
        f"  data:           {home}\n"
        "Ctrl-C stops it.\n",
        flush=True,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, serving, running}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    finally:
        logger.info("Stopping: sessions, then the agent, then the control plane")
        await agent.stop()
        await _stop_sessions(cp, platform)
        server.should_exit = True
        await serving
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    for task in (serving, running):
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> int:
    """``streamspace up [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(prog="streamspace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("up", help="run a control plane and a local agent")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    cmd.add_argument("--port", type=int, help="port (PORT, default 8080)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    overrides: dict[str, object] = {"host": args.host}
    if args.port is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(ControlPlaneSettings, **overrides)
        logging.getLogger().setLevel(settings.log_level)
        asyncio.run(up(settings))
    except StreamSpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
