"""``streamspace-agent``: the agent's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from streamspace_sdk import drivers, protocol, redact
from streamspace_sdk.agent import Agent
from streamspace_sdk.errors import StreamSpaceError
from streamspace_sdk.settings import AgentSettings, load_settings

__all__ = ["main", "show_plugins"]


def show_plugins(groups: list[str] | None = None, *, as_json: bool = False) -> int:
    """Print installed plugins of ``groups`` (all by default); return 1 if one is broken.

    Shared by ``streamspace-agent plugins`` and ``streamspace-controlplane plugins``.
    """
    infos = drivers.list_plugins(groups)
    if as_json:
        print(json.dumps([asdict(i) for i in infos], indent=2))
        return 0
    rows = [("GROUP", "NAME", "VERSION", "ENTRY POINT", "CAPABILITIES")]
    for i in infos:
        caps = f"ERROR: {i.error}" if i.error else ",".join(i.capabilities) or "-"
        rows.append((i.group, i.name, f"{i.distribution} {i.version}", i.entry_point, caps))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[4])
    return 1 if any(i.error for i in infos) else 0


def _plugins(args: argparse.Namespace) -> int:
    return show_plugins([args.group] if args.group else None, as_json=args.json)


def _run(_args: argparse.Namespace) -> int:
    """Run the agent from the environment until SIGTERM or SIGINT."""
    try:
        settings = load_settings(AgentSettings)
        logging.basicConfig(level=settings.log_level, format="%(levelname)s: %(message)s")
        redact.install()  # at DEBUG, the WebSocket library traces handshakes and frames
        agent = Agent(settings)
        agent.run()
    except StreamSpaceError as exc:  # a bad setting, a missing driver, a taken HEALTH_PORT
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _protocol_schema(_args: argparse.Namespace) -> int:
    print(json.dumps(protocol.json_schema(), indent=2, sort_keys=True))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamspace-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run the agent: connect to CONTROL_PLANE_URL and run sessions on PLATFORM",
        description="Run the agent with the settings in the environment (AGENT_ID, "
        "CONTROL_PLANE_URL, AGENT_TOKEN, PLATFORM, ...) until SIGTERM or SIGINT; sessions "
        "keep running when it stops.",
    )
    r.set_defaults(func=_run)
    p = sub.add_parser("plugins", help="list installed drivers and hook plugins")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--group", help="only this entry-point group, e.g. streamspace.platforms")
    p.set_defaults(func=_plugins)
    s = sub.add_parser("protocol-schema", help="print the wire protocol's JSON Schema")
    s.set_defaults(func=_protocol_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
