"""`hive-ag3nt` / `hive-m1nd`: the harness (`serve`), its MCP server (`mcp`) and `wake`."""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
from collections.abc import Sequence

import trio

from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import HiveError


def build_parser(prog: str, role: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the turn loop and web UI"), ("mcp", "stdio MCP server")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--role", choices=["agent", "manager"], default=role or "agent")
    wake = sub.add_parser("wake", help="drop a message into this agent's own inbox")
    wake.add_argument("--from", dest="sender", required=True)
    wake.add_argument("--body", required=True, help="the text, or - to read standard input")
    wake.add_argument("--role", choices=["agent", "manager"], default=role or "agent")
    return parser


def main(
    argv: Sequence[str] | None = None, *, prog: str = "hive-ag3nt", role: str | None = None
) -> int:
    args = build_parser(prog, role).parse_args(argv)
    settings = HarnessSettings.from_env(args.role)
    if args.command == "mcp":
        from hyperhive.agent.mcp_server import run_stdio

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        run_stdio(settings)
        return 0
    if args.command == "wake":
        body = sys.stdin.read() if args.body == "-" else args.body
        try:
            trio.run(call_once, settings.socket, wire.Wake(sender=args.sender, body=body))
        except HiveError as err:
            print(f"{prog}: {err.message}", file=sys.stderr)
            return 1
        return 0
    from hyperhive.agent.harness import serve

    # The harness holds the UI token in memory. Not dumpable: the agent's own tools (same uid)
    # cannot read its /proc/<pid>/mem, environ or fds, nor attach to it.
    _not_dumpable()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    trio.run(serve, settings)
    return 0


PR_SET_DUMPABLE = 4


def _not_dumpable() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        logging.getLogger(__name__).warning("prctl(PR_SET_DUMPABLE, 0) failed")


def main_agent() -> int:
    return main(prog="hive-ag3nt", role="agent")


def main_manager() -> int:
    return main(prog="hive-m1nd", role="manager")
