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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
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


Sender = Callable[[], Awaitable[object]]
"""One request/reply send on a connection of its own."""


async def run_flood(
    connect: Callable[[], AbstractAsyncContextManager[Sender]],
    senders: int,
    total: int,
    background: int,
) -> None:
    """`senders` connections sending `total` messages, request by request; in the background
    (a load under another measurement) it says `ready` once every one is sending. Prints the
    rate."""
    per = total // senders
    connected = trio.Event()
    count = 0

    async def one() -> None:
        nonlocal count
        async with connect() as send:
            await send()
            count += 1
            if count == senders:
                connected.set()
            for _ in range(per - 1):
                await send()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(senders):
            nursery.start_soon(one)
        if background:
            await connected.wait()
            print("ready", flush=True)
    print(json.dumps(per * senders / (time.perf_counter() - t0)), flush=True)


async def flood(sock: str, senders: int, total: int, background: int = 0) -> None:
    """The hive's flood: sends to `sink` from `sock`'s agent."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[Sender]:
        async with open_client(sock) as client:
            yield partial(client.call, wire.Send(to="sink", body="m"))

    await run_flood(connect, senders, total, background)


# ----------------------------------------------------------------------------- Redis, the anchor
#
# The same client shapes as above, speaking RESP over the same kind of unix socket from trio:
# an inbox is a list, `send` is LPUSH (a request and its reply), a parked `recv` is BLPOP.


def resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RespStream:
    """Just enough of a RESP reader for LPUSH's integer and BLPOP's [key, value] replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("redis closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    async def reply(self) -> object:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self.buf) < size + 2:
                self.buf += await self.stream.receive_some(65536)
            data, self.buf = self.buf[:size], self.buf[size + 2 :]
            return data
        if kind == b"*":
            return [await self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected RESP line {line!r}")

    async def call(self, *args: str) -> object:
        await self.stream.send_all(resp(*args))
        return await self.reply()


async def redis_ponger(path: str, rounds: int) -> None:
    conn = RespStream(await trio.open_unix_socket(path))
    print("ready", flush=True)
    for _ in range(rounds):
        got = await conn.call("BLPOP", "pongb", "60")
        assert isinstance(got, list)
        await conn.call("LPUSH", "pinga", got[1].decode())


async def redis_pinger(path: str, rounds: int) -> None:
    conn = RespStream(await trio.open_unix_socket(path))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await conn.call("LPUSH", "pongb", "ping")
        got = await conn.call("BLPOP", "pinga", "60")
        assert isinstance(got, list)
        samples.append((time.perf_counter() - t0) / 2)
    print(json.dumps(samples), flush=True)


async def redis_flood(path: str, senders: int, total: int, background: int = 0) -> None:
    """The same flood on Redis: LPUSH to `sink`."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[Sender]:
        conn = RespStream(await trio.open_unix_socket(path))
        async with conn.stream:
            yield partial(conn.call, "LPUSH", "sink", "m")

    await run_flood(connect, senders, total, background)


def bench_redis(
    root: Path, args: argparse.Namespace, floor: list[float], *, fsync: bool
) -> dict[str, float]:
    """redis-server on a unix socket: `appendonly yes` + `appendfsync always` (every write on
    disk before its reply, the broker's promise), or no persistence at all."""
    import redis  # the bench extra: checks the server runs the persistence asked for

    root.mkdir(parents=True)
    path = str(root / "redis.sock")
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "always"] if fsync else ["--appendonly", "no"]
    )
    mode = "appendfsync always" if fsync else "no persistence"
    print(f"-- redis-server, {mode}")
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            path,
            "--dir",
            str(root),
            "--save",
            "",
            *persistence,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("redis-server did not come up")
            time.sleep(0.01)
        admin = redis.Redis(unix_socket_path=path)
        admin.ping()
        config = admin.config_get("append*")
        assert config["appendonly"] == ("yes" if fsync else "no"), config
        if fsync:
            assert config["appendfsync"] == "always", config
        figures = wake_and_rate(
            args,
            floor,
            ponger=("redis-ponger", path),
            pinger=("redis-pinger", path),
            flood=("redis-flood", path),
        )
        admin.close()
        return figures
    finally:
        server.terminate()
        server.wait(timeout=30)


def report_wake(wake: list[float], floor: list[float]) -> dict[str, float]:
    p50, p99 = pct(wake, 0.5), pct(wake, 0.99)
    print(
        f"durable send->recv wake latency (one leg)       p50 {p50 * 1e3:.3f} ms"
        f"   p99 {p99 * 1e3:.3f} ms   ({p50 / pct(floor, 0.5):.1f}x the floor p50)"
    )
    return {"p50": p50, "p99": p99}


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
) -> dict[str, float]:
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
        for name in ("pinga", "pongb", "sink", "flooder"):
            host(run_dir, wire.Spawn(name=name))
            host(run_dir, wire.Kill(name=name))  # sockets stay; no container competes

        def sock(name: str) -> str:
            return str(run_dir / "agents" / name / "mcp.sock")

        for name in ("pinga", "pongb"):  # drain the spawn notices
            trio.run(call_once, sock(name), wire.Recv())
        figures = wake_and_rate(
            args,
            floor,
            ponger=("ponger", sock("pongb")),
            pinger=("pinger", sock("pinga")),
            flood=("flood", sock("flooder")),
        )
        return figures
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def wake_and_rate(
    args: argparse.Namespace,
    floor: list[float],
    *,
    ponger: tuple[str, str],
    pinger: tuple[str, str],
    flood: tuple[str, str],
) -> dict[str, float]:
    """Wake latency alone, throughput with 1/8/64 senders, and the wake latency again while 64
    senders flood another inbox (a busy hive must not make a waiting agent slow)."""
    pong = child(ponger[0], ponger[1], str(args.rounds))
    wait_ready(pong)
    wake = result(child(pinger[0], pinger[1], str(args.rounds)))
    pong.wait()
    assert isinstance(wake, list)
    figures = report_wake(wake, floor)
    for senders in (1, 8, 64):
        rate = result(child(flood[0], flood[1], str(senders), str(args.messages)))
        assert isinstance(rate, float)
        figures[f"rate{senders}"] = rate
        print(f"durable throughput, {senders:>2} concurrent senders      {rate:,.0f} msg/s")
    # Loaded: the flood runs for as long as the ping-pong does.
    pong = child(ponger[0], ponger[1], str(args.rounds))
    wait_ready(pong)
    load = child(flood[0], flood[1], "64", str(args.messages * 20), "1")
    wait_ready(load)
    loaded = result(child(pinger[0], pinger[1], str(args.rounds)))
    pong.wait()
    load.terminate()
    load.wait()
    assert isinstance(loaded, list)
    figures["loaded_p50"], figures["loaded_p99"] = pct(loaded, 0.5), pct(loaded, 0.99)
    print(
        f"  ... while 64 senders flood another inbox      p50 {figures['loaded_p50'] * 1e3:.3f}"
        f" ms   p99 {figures['loaded_p99'] * 1e3:.3f} ms"
    )
    return figures


def print_ratios(ours: dict[str, float], redis: dict[str, float]) -> None:
    """hyperhive (group commit) against Redis with appendfsync always, from this one run."""
    print("-- hyperhive / Redis appendfsync always (latency: < 1 is faster; rate: > 1 is more)")
    rows = [
        ("wake p50", "p50", 1e3, "ms"),
        ("wake p99", "p99", 1e3, "ms"),
        ("wake p50 under a 64-sender flood", "loaded_p50", 1e3, "ms"),
        ("wake p99 under a 64-sender flood", "loaded_p99", 1e3, "ms"),
        ("throughput, 1 sender", "rate1", 1, "msg/s"),
        ("throughput, 8 senders", "rate8", 1, "msg/s"),
        ("throughput, 64 senders", "rate64", 1, "msg/s"),
    ]
    for label, key, scale, unit in rows:
        a, b = ours[key] * scale, redis[key] * scale
        print(f"{label:<34} {a:>10,.3f} vs {b:>10,.3f} {unit:<5}  ratio {a / b:.2f}")
    print(
        f"{'loaded p99 / unloaded p99':<34} hyperhive {ours['loaded_p99'] / ours['p99']:.2f}"
        f"   redis {redis['loaded_p99'] / redis['p99']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=16000)
    parser.add_argument("--role", nargs="+")
    parser.add_argument(
        "--no-redis", action="store_true", help="skip the Redis anchor even if redis-server is here"
    )
    parser.add_argument(
        "--only-group-commit",
        action="store_true",
        help="skip the daemon with one fsync per write (a quicker run)",
    )
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        fns: dict[str, Callable[..., Awaitable[None]]] = {
            "echo-server": echo_server,
            "echo-client": echo_client,
            "ponger": ponger,
            "pinger": pinger,
            "flood": flood,
            "redis-ponger": redis_ponger,
            "redis-pinger": redis_pinger,
            "redis-flood": redis_flood,
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

        # 2. against a real daemon, with group commit (and with one fsync per write)
        ours = bench_daemon(root / "gc", args, floor, group_commit=True)
        if not args.only_group_commit:
            bench_daemon(root / "full", args, floor, group_commit=False)
        # 3. the anchor: Redis with the same promise (and with none), the same client shapes
        if args.no_redis or shutil.which("redis-server") is None:
            print("(no redis-server on PATH: the Redis anchor is skipped)")
            return
        durable = bench_redis(root / "redis-always", args, floor, fsync=True)
        bench_redis(root / "redis-none", args, floor, fsync=False)
        print_ratios(ours, durable)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
