#!/usr/bin/env python3
"""Harness overhead per turn: the same prompt through a bare `claude -p` and through the
harness's own claude invocation (its settings, system prompt, the hyperhive MCP server, the
allowed tools), both against the scripted model on loopback. Run by hand:

    .venv/bin/python scripts/bench_harness.py [--turns 8]

Prints the median wall time of each and the harness's overhead; and a harness's cold start:
the CPU its process spends importing what it needs before it can take a turn.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from hyperhive.agent.claude import CLAUDE_DEFAULTS, claude_argv
from hyperhive.agent.harness import _mcp_session
from hyperhive.agent.mcp_bridge import serve_bridge
from hyperhive.agent.settings import HarnessSettings, write_claude_files
from hyperhive.core.server import Peer, SocketServer
from hyperhive.demo.model import serve_model
from hyperhive.protocol import wire
from hyperhive.protocol.codec import AGENT_DECODER

PROMPTS = {
    "a text answer": '<hive-message from="operator">!text fine, thanks</hive-message>',
    "an answer by `send`": '<hive-message from="operator">hello, how are you?</hive-message>',
}
"""The same prompt to both. The scripted model answers the first in text, one model round
trip either way, so the difference is the harness's alone (its settings, system prompt, MCP
session); the second it answers, given the harness's tools, with the `send` tool: one more
round trip and a tool call, the agent's work (the bare run has no tools and answers in text)."""


class _Answers:
    """Answers the scripted model's tool calls the way the daemon would, without a hive."""

    async def handle(self, request: object, peer: Peer) -> wire.Reply:
        match request:
            case wire.Send(to=to):
                return wire.Sent(ids=[1], recipients=[to])
            case wire.Status():
                return wire.StatusReply(name="bench", role="agent", unread=0, in_flight=0)
        return wire.Done()


def _agent_socket(path: str) -> SocketServer[object]:
    return SocketServer(path, AGENT_DECODER, _Answers(), name="agent")


async def one_turn(argv: list[str], env: dict[str, str], cwd: str, prompt: str) -> float:
    t0 = time.perf_counter()
    done = await trio.run_process(
        argv,
        stdin=prompt.encode(),
        capture_stdout=True,
        capture_stderr=True,
        env=env,
        cwd=cwd,
        check=False,
    )
    took = time.perf_counter() - t0
    if b'"type":"result"' not in done.stdout:
        raise RuntimeError(f"no result from {argv[0]}: {done.stderr.decode()[-500:]}")
    return took


async def bench(turns: int, bridge: bool, ablate: bool) -> None:
    claude = shutil.which("claude")
    if claude is None:
        raise SystemExit("no claude CLI on PATH")
    root = Path(tempfile.mkdtemp(prefix="hh-", dir="/tmp"))
    try:
        async with trio.open_nursery() as nursery:
            base_url = await nursery.start(partial(serve_model, port=0))
            home = root / "home"
            (home / ".claude").mkdir(parents=True)
            env = {
                **os.environ,
                **CLAUDE_DEFAULTS,
                "HOME": str(home),
                "CLAUDE_CONFIG_DIR": str(home / ".claude"),
                "ANTHROPIC_BASE_URL": base_url,
                "ANTHROPIC_API_KEY": "sk-ant-bench",
            }
            settings = HarnessSettings(
                label="bench",
                role="agent",
                socket=str(root / "run" / "mcp.sock"),
                state_dir=root / "state",
                runtime_dir=root / "run",
                claude=claude,
                claude_config_dir=home / ".claude",
            )
            (root / "state").mkdir()
            await trio.to_thread.run_sync(write_claude_files, settings)
            # The agent's socket, answering what the turn's tools ask (the scripted model
            # replies with `send`): the daemon's part is the broker benchmark's.
            await nursery.start(_agent_socket(settings.socket).serve)
            if bridge:  # what the harness serves claude's MCP sessions from (harness.serve)
                await nursery.start(
                    serve_bridge, settings.runtime_dir, partial(_mcp_session, settings)
                )
            bare = [
                claude,
                "--print",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                "haiku",
            ]
            harness = claude_argv(settings, model="haiku", resume=False)
            cwd = str(root / "state")
            await one_turn(bare, env, cwd, PROMPTS["a text answer"])  # warm the disk cache
            for what, prompt in PROMPTS.items():
                results: dict[str, list[float]] = {"bare": [], "harness": []}
                for _ in range(turns):  # interleaved, so drift hits both alike
                    results["bare"].append(await one_turn(bare, env, cwd, prompt))
                    results["harness"].append(await one_turn(harness, env, cwd, prompt))
                b, h = statistics.median(results["bare"]), statistics.median(results["harness"])
                print(f"-- the harness's turn is {what}")
                print(f"bare claude -p, median of {turns}:            {b:6.3f} s")
                print(f"the harness's claude invocation, median:     {h:6.3f} s")
                print(
                    f"overhead per turn:                           {h - b:+6.3f} s"
                    f" ({(h / b - 1) * 100:+.1f} %)"
                )
            if ablate:
                await _ablation(turns, env, cwd, bare, harness)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _without(argv: list[str], flag: str, values: int = 1) -> list[str]:
    at = argv.index(flag)
    return argv[:at] + argv[at + 1 + values :]


async def _ablation(
    turns: int, env: dict[str, str], cwd: str, bare: list[str], harness: list[str]
) -> None:
    """Where the harness's overhead on a text answer goes: its invocation without each part."""
    variants = {
        "bare claude -p": bare,
        "the harness's invocation": harness,
        "  without its MCP server": _without(
            _without(harness, "--mcp-config"), "--strict-mcp-config", 0
        ),
        "  without its settings": _without(harness, "--settings"),
        "  without its system prompt": _without(harness, "--system-prompt-file"),
        "  without its allowed tools": _without(harness, "--allowedTools"),
    }
    took: dict[str, list[float]] = {what: [] for what in variants}
    for _ in range(turns):
        for what, argv in variants.items():
            took[what].append(await one_turn(argv, env, cwd, PROMPTS["a text answer"]))
    print(f"-- ablation, a text answer, median of {turns}")
    for what, times in took.items():
        print(f"{what:<45} {statistics.median(times):6.3f} s")


def cold_start() -> None:
    for what, code in (
        ("harness (what a turn needs)", "import hyperhive.agent.main, hyperhive.agent.harness"),
        (
            "+ its web UI (on the first page view)",
            "import hyperhive.agent.harness, hyperhive.agent.ui",
        ),
        ("the MCP server (once per harness, its first turn)", "import hyperhive.agent.mcp_server"),
    ):
        cpu = []
        for _ in range(5):
            t = os.times()
            subprocess.run([sys.executable, "-c", code], check=True)
            after = os.times()
            cpu.append(
                after.children_user + after.children_system - t.children_user - t.children_system
            )
        print(f"cold import, {what:<50} {statistics.median(cpu):.3f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument(
        "--no-bridge",
        action="store_true",
        help="as before the bridge: claude starts `hive-ag3nt mcp` (the `mcp` package) each turn",
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also run the harness's invocation without each of its parts (MCP server, settings,"
        " system prompt, allowed tools)",
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    cold_start()
    trio.run(bench, args.turns, not args.no_bridge, args.ablate)


if __name__ == "__main__":
    main()
