"""``streamspace-controlplane``: serve, migrate, create users and agent tokens, list plugins."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

import uvicorn

from streamspace_controlplane.app import build_control_plane, create_app
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.settings import ControlPlaneSettings, load_settings
from streamspace_sdk import redact
from streamspace_sdk.cli import show_plugins
from streamspace_sdk.drivers import HOOKS, HUBS, LEASES, PLATFORMS, STORES, TRANSPORTS
from streamspace_sdk.errors import StreamSpaceError

__all__ = ["main"]

logger = logging.getLogger("streamspace.controlplane")


def _settings(args: argparse.Namespace) -> ControlPlaneSettings:
    overrides = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "host", None) is not None:
        overrides["host"] = args.host
    return load_settings(ControlPlaneSettings, **overrides)


def server_config(cp: ControlPlane) -> uvicorn.Config:
    """Return uvicorn's config for ``cp``: websockets without compression (VNC data is
    already compressed; deflate would cost CPU and memory per connection)."""
    config = uvicorn.Config(
        create_app(cp),
        host=cp.settings.host,
        port=cp.settings.port,
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        ws_ping_interval=cp.settings.ws_ping_interval,
        ws_ping_timeout=cp.settings.ws_ping_timeout,
        timeout_keep_alive=max(1, round(cp.settings.http_keepalive_timeout)),
        lifespan="on",
        log_level=cp.settings.log_level.lower(),
        proxy_headers=True,
    )
    redact.install()  # uvicorn logs WebSocket URLs; VNC and stream tokens ride in them
    return config


def _serve(args: argparse.Namespace) -> int:
    cp = build_control_plane(_settings(args))
    logging.getLogger().setLevel(cp.settings.log_level)
    logger.info(
        "StreamSpace control plane: store %s, hub %s (replica %s), http://%s:%d",
        cp.store.name,
        cp.hub.name,
        cp.hub.pod,
        cp.settings.host,
        cp.settings.port,
    )
    server = uvicorn.Server(server_config(cp))
    server.run()
    return 0 if server.started else 1


async def _with_store(cp: ControlPlane, work: Callable[[], Awaitable[int]]) -> int:
    await cp.store.connect()
    try:
        return await work()
    finally:
        await cp.store.close()


def _migrate(args: argparse.Namespace) -> int:
    cp = build_control_plane(_settings(args))

    async def work() -> int:
        applied = await cp.store.migrate()
        version = await cp.store.schema_version()
        print(f"applied {applied or 'nothing'}; schema version {version}")
        return 0

    return asyncio.run(_with_store(cp, work))


def _create_user(args: argparse.Namespace) -> int:
    from streamspace_controlplane.services import users

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    cp = build_control_plane(_settings(args))

    async def work() -> int:
        await cp.store.migrate()
        user = await users.create_user(
            cp, args.username, password, "admin" if args.admin else "user", actor="cli"
        )
        print(f"created {user.role} {user.username}")
        return 0

    return asyncio.run(_with_store(cp, work))


def _create_agent_token(args: argparse.Namespace) -> int:
    from streamspace_controlplane.services import agents

    cp = build_control_plane(_settings(args))

    async def work() -> int:
        await cp.store.migrate()
        token, record = await agents.create_token(cp, args.agent_id, actor="cli")
        print(token)
        print(
            f"token {record.token_id} for agent {record.agent_id}: shown once, only its "
            "hash is stored; set it as AGENT_TOKEN on the agent",
            file=sys.stderr,
        )
        return 0

    return asyncio.run(_with_store(cp, work))


def _plugins(args: argparse.Namespace) -> int:
    groups = [PLATFORMS, LEASES, TRANSPORTS, STORES, HUBS, HOOKS]
    return show_plugins(groups, as_json=args.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamspace-controlplane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the control plane (HTTP, WebSockets, loops)")
    serve.add_argument("--host", help="address to listen on (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (PORT, default 8080)")
    serve.set_defaults(func=_serve)
    sub.add_parser("migrate", help="apply database migrations and exit").set_defaults(func=_migrate)
    user = sub.add_parser("create-user", help="create a user (password from a prompt)")
    user.add_argument("username")
    user.add_argument("--admin", action="store_true", help="give the admin role")
    user.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    user.set_defaults(func=_create_user)
    token = sub.add_parser("create-agent-token", help="issue a token for an agent; printed once")
    token.add_argument("agent_id")
    token.set_defaults(func=_create_agent_token)
    plugins = sub.add_parser("plugins", help="list installed drivers and hook plugins")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.set_defaults(func=_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        status: int = args.func(args)
    except StreamSpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
