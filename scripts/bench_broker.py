#!/usr/bin/env python3
"""Broker benchmark: the socket floor, durable send→recv wake latency, durable throughput.

Runs a real daemon (`hive-c0re serve`, no containers kept running) in a temporary directory and
drives it from separate client processes, as agents would. Prints one table; run by hand:

    .venv/bin/python scripts/bench_broker.py [--rounds 2000] [--messages 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


# ----------------------------------------------------------------------------- child roles


async def echo_server(path: str) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    await stream.send_all(line + b"\n")

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(16)
    print("ready", flush=True)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


async def echo_client(path: str, rounds: int) -> None:
    stream = await trio.open_unix_socket(path)
    samples = []
    line = json.dumps({"cmd": "send", "to": "b", "body": "x" * 64}).encode() + b"\n"
    for _ in range(rounds):
        t0 = time.perf_counter()
        await stream.send_all(line)
        got = b""
        while not got.endswith(b"\n"):
            got += await stream.receive_some(65536)
        samples.append(time.perf_counter() - t0)
    print(json.dumps(samples), flush=True)


async def ponger(sock: str, rounds: int) -> None:
    async with open_client(sock) as client:
        print("ready", flush=True)
        for _ in range(rounds):
            got = await client.call(wire.Recv(wait_seconds=60))
            assert got.message is not None
            await client.call(wire.Send(to="pinga", body=got.message.body))


async def pinger(sock: str, rounds: int) -> None:
    samples = []
    async with open_client(sock) as client:
        for _ in range(rounds):
            t0 = time.perf_counter()
            await client.call(wire.Send(to="pongb", body="ping"))
            got = await client.call(wire.Recv(wait_seconds=60))
            assert got.message is not None
            samples.append((time.perf_counter() - t0) / 2)
    print(json.dumps(samples), flush=True)


async def flood(sock: str, senders: int, total: int) -> None:
    per = total // senders

    async def one() -> None:
        async with open_client(sock) as client:
            for _ in range(per):
                await client.call(wire.Send(to="sink", body="m"))

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(senders):
            nursery.start_soon(one)
    print(json.dumps(per * senders / (time.perf_counter() - t0)), flush=True)


# ----------------------------------------------------------------------------- driver


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", *args], stdout=subprocess.PIPE, text=True
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


def result(proc: subprocess.Popen[str]) -> object:
    out, _ = proc.communicate(timeout=600)
    return json.loads(out.strip().splitlines()[-1])


def host(run_dir: Path, request: wire.HostRequest[wire.Reply]) -> None:
    trio.run(call_once, str(run_dir / "host.sock"), request)


def bench_daemon(
    root: Path, args: argparse.Namespace, floor: list[float], *, group_commit: bool
) -> None:
    run_dir, state = root / "run", root / "state"
    mode = "group commit" if group_commit else "synchronous=FULL, one fsync per write"
    print(f"-- daemon with {mode}")
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hyperhive.cli",
            "--run-dir",
            str(run_dir),
            "serve",
            "--state-dir",
            str(state),
            "--no-manager",
            "--dashboard-port",
            "-1",
            "--log-level",
            "WARNING",
            *([] if group_commit else ["--no-group-commit"]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdout is not None
    daemon.stdout.readline()
    try:
        for name in ("pinga", "pongb", "sink"):
            host(run_dir, wire.Spawn(name=name))
            host(run_dir, wire.Kill(name=name))  # sockets stay; no container competes

        def sock(name: str) -> str:
            return str(run_dir / "agents" / name / "mcp.sock")

        for name in ("pinga", "pongb"):  # drain the spawn notices
            trio.run(call_once, sock(name), wire.Recv())
        pong = child("ponger", sock("pongb"), str(args.rounds))
        wait_ready(pong)
        wake = result(child("pinger", sock("pinga"), str(args.rounds)))
        pong.wait()
        assert isinstance(wake, list)
        p50, p99 = pct(wake, 0.5), pct(wake, 0.99)
        print(
            f"durable send->recv wake latency (one leg)       p50 {p50 * 1e3:.3f} ms"
            f"   p99 {p99 * 1e3:.3f} ms   ({p50 / pct(floor, 0.5):.1f}x the floor p50)"
        )
        for senders in (1, 8, 64):
            rate = result(child("flood", sock("pinga"), str(senders), str(args.messages)))
            assert isinstance(rate, float)
            print(f"durable throughput, {senders:>2} concurrent senders      {rate:,.0f} msg/s")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=16000)
    parser.add_argument("--role", nargs="+")
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        fns: dict[str, Callable[..., Awaitable[None]]] = {
            "echo-server": echo_server,
            "echo-client": echo_client,
            "ponger": ponger,
            "pinger": pinger,
            "flood": flood,
        }
        trio.run(fns[role], rest[0], *(int(x) for x in rest[1:]))
        return

    root = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    try:
        print(
            f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"{platform.python_implementation()} {platform.python_version()}, "
            f"{platform.platform()}"
        )
        # 1. the floor
        path = str(root / "echo.sock")
        server = child("echo-server", path)
        wait_ready(server)
        floor = result(child("echo-client", path, str(args.rounds)))
        server.terminate()
        assert isinstance(floor, list)
        print(
            f"floor: unix-socket JSON-line echo round trip   p50 {pct(floor, 0.5) * 1e3:.3f} ms"
            f"   p99 {pct(floor, 0.99) * 1e3:.3f} ms"
        )

        # 2. and 3. against a real daemon, with group commit and with one fsync per write
        for group in (True, False):
            bench_daemon(root / ("gc" if group else "full"), args, floor, group_commit=group)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
