"""``streamspace-agent``: the agent's command line."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict

from websockets.frames import Frame, Opcode

from streamspace_sdk import drivers, protocol
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


_WIRE_LOGGER = "websockets.client"
"""Where the WebSocket library traces the sockets the agent dials, at DEBUG."""
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_HEADER_FORMATS = frozenset({"< %s: %s", "> %s: %s"})
_STREAM_PATH = re.compile(r"(/api/v1/agents/vnc/)[^\s?/]+")
_REDACTED = "[redacted]"


class _FrameSummary:
    """A traced frame's kind and size, instead of its payload."""

    def __init__(self, frame: Frame) -> None:
        self._frame = frame

    def __str__(self) -> str:
        if self._frame.opcode in (Opcode.CLOSE, Opcode.PING, Opcode.PONG):
            return str(self._frame)
        return f"{self._frame.opcode.name} [{len(self._frame.data)} bytes, payload not logged]"


class _WireRedactor(logging.Filter):
    """Keeps the agent token (the handshake's ``Authorization``), stream tokens (in a
    ``ws-dedicated`` dial's path and in ``vnc.open`` frames) and VNC bytes (what users
    type) out of the WebSocket library's DEBUG traces."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            args = tuple(_redact_arg(a) for a in record.args)
            if (
                record.msg in _HEADER_FORMATS
                and len(args) == 2
                and str(args[0]).lower() in _SECRET_HEADERS
            ):
                args = (args[0], _REDACTED)
            record.args = args
        return True


def _redact_arg(arg: object) -> object:
    if isinstance(arg, Frame):
        return _FrameSummary(arg)
    if isinstance(arg, str):
        return _STREAM_PATH.sub(lambda m: m.group(1) + _REDACTED, arg)
    return arg


def _redact_wire_traces() -> None:
    """Install :class:`_WireRedactor` (once) where the agent's sockets are traced."""
    logger = logging.getLogger(_WIRE_LOGGER)
    if not any(isinstance(f, _WireRedactor) for f in logger.filters):
        logger.addFilter(_WireRedactor())


def _plugins(args: argparse.Namespace) -> int:
    return show_plugins([args.group] if args.group else None, as_json=args.json)


def _run(_args: argparse.Namespace) -> int:
    """Run the agent from the environment until SIGTERM or SIGINT."""
    try:
        settings = load_settings(AgentSettings)
        logging.basicConfig(level=settings.log_level, format="%(levelname)s: %(message)s")
        _redact_wire_traces()  # LOG_LEVEL=DEBUG traces the handshake and every frame
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
