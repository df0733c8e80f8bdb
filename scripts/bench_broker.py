#!/usr/bin/env python3
"""Broker benchmark: the socket floor, durable send→recv wake latency, durable throughput.

Runs a real daemon (`hive-c0re serve`, no containers kept running) in a temporary directory and
drives it from separate client processes, as agents would. Prints one table; run by hand:

    .venv/bin/python scripts/bench_broker.py [--rounds 2000] [--messages 20000]

With `--swarm` (the swarm extra: `pip install -e '.[swarm]'`) the same run sets the single-host
daemon against a swarm instead of Redis: a 3-node NATS cluster (JetStream, `sync_interval:
always`, streams R3) and two daemons, h1 and h2, the pinger on h1 and the ponger on h2 (every
wake crosses hosts), 64 senders on h1 flooding a sink on h2 that drains as they send.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
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


async def drain(sock: str, total: int) -> None:
    """The sink, as a harness taking its messages: until `total` came, or none for 30 s.
    Prints how many it took."""
    got = 0
    async with open_client(sock) as client:
        print("ready", flush=True)
        while got < total:
            if (await client.call(wire.Recv(wait_seconds=30))).message is None:
                break
            got += 1
    print(json.dumps(got), flush=True)


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
            server=server.pid,
        )
        admin.close()
        return figures
    finally:
        server.terminate()
        server.wait(timeout=30)


TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of `pid`, by "tid name"."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as fh:
                raw = fh.read()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        name = raw.split("(", 1)[1].rsplit(")", 1)[0]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{tid} {name}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def report_cpu(server: int, before: dict[str, float], clients: float, legs: int) -> None:
    """Where a wake leg's CPU goes: the server's threads, and the two client processes."""
    after = thread_cpu(server)
    used = {t: after[t] - before.get(t, 0.0) for t in after}
    busy = sorted((t for t in used if used[t] > 0), key=lambda t: -used[t])
    threads = ", ".join(f"{t.split(' ', 1)[1]} {used[t] / legs * 1e6:.0f}" for t in busy[:3])
    print(
        f"  CPU per leg: server {sum(used.values()) / legs * 1e6:.0f} us ({threads}),"
        f" the two clients {clients / legs * 1e6:.0f} us"
    )


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


DAEMONS: dict[Path, int] = {}
"""The pid of the daemon serving each run dir."""


@contextmanager
def running_daemon(root: Path, *flags: str) -> Iterator[Path]:
    """`hive-c0re serve` with its state and run dir in `root` (no manager, no dashboard) until
    the block ends; yields its run dir once host.sock answers."""
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
            "--log-level",
            "WARNING",
            *flags,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        if "host socket" not in daemon.stdout.readline():
            raise RuntimeError(f"the daemon in {root} did not come up")
        DAEMONS[run_dir] = daemon.pid
        yield run_dir
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def agent_sock(run_dir: Path, name: str) -> str:
    return str(run_dir / "agents" / name / "mcp.sock")


def harnessed(run_dir: Path, names: Sequence[str], on: str | None = None) -> None:
    """Spawn `names` (on host `on` of a swarm) and stop them: their sockets stay, no container
    competes, the bench's processes are their harnesses. Their spawn notices are taken."""
    for name in names:
        host(run_dir, wire.Spawn(name=name, host=on))
        host(run_dir, wire.Kill(name=name))
    for name in names:
        while trio.run(call_once, agent_sock(run_dir, name), wire.Recv()).message is not None:
            pass


@dataclass(frozen=True)
class Plan:
    """What `wake_and_rate` measures besides the wake latency."""

    fan_in: tuple[int, ...] = (1, 8, 64)
    """The floods' numbers of concurrent senders."""
    loaded: bool = True
    """The wake latency again, under a 64-sender flood."""
    drain: bool = False
    """The sink takes the flood's messages as they come (else they wait in its inbox)."""


ALL = Plan()
AGAINST_SWARM = Plan(fan_in=(64,), loaded=False, drain=True)
"""`--swarm`: what both sides of that comparison measure."""


def bench_daemon(
    root: Path,
    args: argparse.Namespace,
    floor: list[float],
    *,
    group_commit: bool,
    plan: Plan = ALL,
) -> dict[str, float]:
    mode = "group commit" if group_commit else "synchronous=FULL, one fsync per write"
    print(f"-- daemon with {mode}")
    with running_daemon(root, *([] if group_commit else ["--no-group-commit"])) as run_dir:
        harnessed(run_dir, ("pinga", "pongb", "sink", "flooder"))
        return wake_and_rate(
            args,
            floor,
            plan,
            ponger=("ponger", agent_sock(run_dir, "pongb")),
            pinger=("pinger", agent_sock(run_dir, "pinga")),
            flood=("flood", agent_sock(run_dir, "flooder")),
            sink=("drain", agent_sock(run_dir, "sink")),
            server=DAEMONS[run_dir],
        )


# ----------------------------------------------------------------------------- the swarm


@contextmanager
def nats_cluster(root: Path, nodes: int) -> Iterator[str]:
    """hyperhive.swarm.cluster's nodes (JetStream, `sync_interval: always`) until the block
    ends; yields their URLs, comma-joined."""
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hyperhive.swarm.cluster",
            "--dir",
            str(root),
            "--nodes",
            str(nodes),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        urls = launcher.stdout.readline().strip()
        if not urls.startswith("nats://"):
            raise RuntimeError("the NATS cluster did not come up")
        yield urls
    finally:
        launcher.terminate()  # it stops its nodes
        launcher.wait(timeout=60)


def wait_listed(run_dir: Path, names: set[str]) -> None:
    """Until `run_dir`'s daemon lists `names` (agents of other hosts come through the hive's
    directory)."""
    deadline = time.monotonic() + 30
    while True:
        listed = trio.run(call_once, str(run_dir / "host.sock"), wire.ListAgents())
        if names <= {a.name for a in listed.agents}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run_dir}'s daemon never listed {sorted(names)}")
        time.sleep(0.1)


def bench_swarm(root: Path, args: argparse.Namespace, floor: list[float]) -> dict[str, float]:
    """Two daemons on a 3-node NATS cluster: pinga and the flooder on h1, pongb and the sink
    on h2, so every wake and every flooded message crosses hosts."""
    print("-- swarm: 3 NATS nodes (JetStream R3, sync_interval always), daemons h1 and h2")
    with nats_cluster(root / "nats", 3) as urls:

        def swarm_host(name: str, n: int) -> AbstractContextManager[Path]:
            return running_daemon(
                root / name,
                *("--swarm", urls, "--host-name", name),
                *("--ui-port-base", str(7000 + 1000 * n)),
                *("--agent-uid-base", str(299000 + 1000 * n)),
            )

        with swarm_host("h1", 1) as h1, swarm_host("h2", 2) as h2:
            harnessed(h2, ("pongb", "sink"), on="h2")
            harnessed(h1, ("pinga", "flooder"), on="h1")
            wait_listed(h1, {"pongb", "sink"})
            wait_listed(h2, {"pinga"})
            return wake_and_rate(
                args,
                floor,
                AGAINST_SWARM,
                ponger=("ponger", agent_sock(h2, "pongb")),
                pinger=("pinger", agent_sock(h1, "pinga")),
                flood=("flood", agent_sock(h1, "flooder")),
                sink=("drain", agent_sock(h2, "sink")),
            )


# ----------------------------------------------------------------------------- measurements


def flood_rate(
    flood: tuple[str, str], sink: tuple[str, str] | None, senders: int, messages: int
) -> float:
    """One flood's rate of acknowledged sends, with a draining sink if one is given (the run
    ends once it took them all)."""
    drainer = None
    sent = messages // senders * senders
    if sink is not None:
        drainer = child(sink[0], sink[1], str(sent))
        wait_ready(drainer)
    rate = result(child(flood[0], flood[1], str(senders), str(messages)))
    assert isinstance(rate, float)
    if drainer is not None:
        took = result(drainer)
        assert took == sent, f"the sink took {took} of the {sent} messages sent"
    return rate


def wake_and_rate(
    args: argparse.Namespace,
    floor: list[float],
    plan: Plan = ALL,
    *,
    ponger: tuple[str, str],
    pinger: tuple[str, str],
    flood: tuple[str, str],
    sink: tuple[str, str] | None = None,
    server: int | None = None,
) -> dict[str, float]:
    """Wake latency alone, throughput with 1/8/64 senders, and the wake latency again while 64
    senders flood another inbox (a busy hive must not make a waiting agent slow); or what
    `plan` says of these. With `server` (its pid), where the wake's CPU went."""
    before, clients = (thread_cpu(server) if server else {}), children_cpu()
    pong = child(ponger[0], ponger[1], str(args.rounds))
    wait_ready(pong)
    wake = result(child(pinger[0], pinger[1], str(args.rounds)))
    pong.wait()
    clients = children_cpu() - clients
    assert isinstance(wake, list)
    figures = report_wake(wake, floor)
    if server:
        report_cpu(server, before, clients, 2 * args.rounds)
    for senders in plan.fan_in:
        rate = flood_rate(flood, sink if plan.drain else None, senders, args.messages)
        figures[f"rate{senders}"] = rate
        drained = ", to a draining sink" if plan.drain else ""
        print(
            f"durable throughput, {senders:>2} concurrent senders      {rate:,.0f} msg/s{drained}"
        )
    if not plan.loaded:
        return figures
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


def print_against_swarm(single: dict[str, float], swarm: dict[str, float]) -> None:
    """The single-host daemon (sqlite, group commit) and the swarm, from this one run."""
    print("-- swarm / single host (latency: > 1 is slower; rate: < 1 is fewer)")
    print(f"{'':<40} {'wake p50':>10} {'wake p99':>10} {'64 senders':>16}")
    for label, f in (
        ("single host, sqlite (group commit)", single),
        ("swarm, h1 -> h2 (3 NATS nodes, R3)", swarm),
    ):
        print(
            f"{label:<40} {f['p50'] * 1e3:>7.3f} ms {f['p99'] * 1e3:>7.3f} ms"
            f" {f['rate64']:>10,.0f} msg/s"
        )
    print(
        f"{'ratio swarm / sqlite':<40} {swarm['p50'] / single['p50']:>10.2f}"
        f" {swarm['p99'] / single['p99']:>10.2f} {swarm['rate64'] / single['rate64']:>16.2f}"
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
    parser.add_argument(
        "--swarm",
        action="store_true",
        help="set the daemon against a swarm (3 NATS nodes, daemons h1 and h2) instead of"
        " Redis: wake latency and 64-sender throughput of each",
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
            "drain": drain,
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
        if args.swarm:  # ... or against a swarm
            single = bench_daemon(root / "gc", args, floor, group_commit=True, plan=AGAINST_SWARM)
            print_against_swarm(single, bench_swarm(root / "swarm", args, floor))
            return
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
