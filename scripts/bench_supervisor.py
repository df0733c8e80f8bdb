#!/usr/bin/env python3
"""Supervisor benchmark: N bubblewrap agents with idle harnesses under one daemon.

For each N it starts a fresh daemon (`hive-c0re serve`, bwrap backend, no manager), spawns N
agents at once over host.sock, and prints the time until every harness is up (its web UI
answers), the daemon's RSS, and the daemon's CPU while the hive idles. Run by hand:

    .venv/bin/python scripts/bench_supervisor.py [--agents 10 50 200] [--idle 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client

TICK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def ui_up(port: int) -> None:
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.1)  # polling a port someone else opens: nothing to wait on
            continue
        await stream.aclose()
        return


async def spawn_all(sock: str, n: int) -> dict[str, int]:
    names = [f"b{i}" for i in range(n)]
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(call_once, sock, wire.Spawn(name=name))
    listed = await call_once(sock, wire.ListAgents())
    return {a.name: a.port for a in listed.agents}


async def wait_ui(ports: dict[str, int]) -> None:
    async with trio.open_nursery() as nursery:
        for port in ports.values():
            nursery.start_soon(ui_up, port)


async def wait_both(ports: dict[str, int], sock: str, n: int, t0: float) -> tuple[float, float]:
    """When every UI accepts, and when every harness reports: each on its own clock."""
    done: dict[str, float] = {}

    async def timed(what: str, fn: Callable[[], Awaitable[None]]) -> None:
        await fn()
        done[what] = time.perf_counter() - t0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timed, "ui", partial(wait_ui, ports))
        nursery.start_soon(timed, "reported", partial(wait_reported, sock, n))
    return done["ui"], done["reported"]


async def wait_reported(sock: str, n: int) -> None:
    """Until every harness has connected to its socket and reported its state (`turn_state`):
    it runs and takes turns (a relayed UI port can accept before its harness is up)."""
    async with open_client(sock) as client:
        await client.call(wire.Subscribe())
        while True:
            listed = await call_once(sock, wire.ListAgents())
            if sum(a.turn_state is not None for a in listed.agents) >= n:
                return
            async for event in client.events():
                if isinstance(event, wire.AgentChanged):
                    break


def bench(n: int, idle: float) -> None:
    root = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    run_dir = root / "run"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hyperhive.cli",
            "--run-dir",
            str(run_dir),
            "serve",
            "--state-dir",
            str(root / "state"),
            "--no-manager",
            "--dashboard-port",
            "-1",
            "--ui-port-base",
            # Below Linux's ephemeral range (32768-60999): the bench's own connections must
            # not take an agent's UI port.
            "20000",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        daemon.stdout.readline()
        base_rss = rss_mb(daemon.pid)
        t0 = time.perf_counter()
        ports = trio.run(spawn_all, str(run_dir / "host.sock"), n)
        spawned = time.perf_counter() - t0
        up, reported = trio.run(wait_both, ports, str(run_dir / "host.sock"), n, t0)
        if os.environ.get("HIVE_BENCH_CENSUS"):
            subprocess.run([sys.executable, os.environ["HIVE_BENCH_CENSUS"]], check=False)
        time.sleep(2)  # let start-up work settle before measuring idleness
        c0, w0 = cpu_seconds(daemon.pid), time.perf_counter()
        time.sleep(idle)
        cpu = (cpu_seconds(daemon.pid) - c0) / (time.perf_counter() - w0) * 100
        rss = rss_mb(daemon.pid)
        print(
            f"N={n:>3}: spawned in {spawned:5.2f} s, all UIs accept in {up:6.2f} s, all"
            f" harnesses connected and reporting in {reported:6.2f} s;"
            f" daemon RSS {rss:6.1f} MB (idle daemon {base_rss:.1f} MB);"
            f" daemon idle CPU {cpu:5.2f}% = {cpu / n:.3f}% per agent"
        )
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--idle", type=float, default=20.0)
    args = parser.parse_args()
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    for n in args.agents:
        bench(n, args.idle)


if __name__ == "__main__":
    main()
